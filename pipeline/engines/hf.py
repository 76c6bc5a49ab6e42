"""transformers engine: LLaVA / LLaVA-NeXT with left-padded batched `generate` (no Ray)."""

from __future__ import annotations

import gc
import logging
import threading
from typing import Iterator

import numpy as np

from ..checkpoint import Checkpoint
from ..config import Config, GenerationConfig
from ..records import PreparedRequest, Result
from .base import EngineLabels, generate_with_row_fallback, resolve_device, resolve_dtype, truncate_at_stop

logger = logging.getLogger(__name__)


def bnb_config(cfg: Config):
    """transformers' BitsAndBytesConfig for model.quantization, as on the LLaVA model cards."""
    import torch
    from transformers import BitsAndBytesConfig

    q = cfg.model.quantization
    if q.mode == "none":
        return None
    if q.mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=q.skip_modules)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=getattr(torch, q.bnb_4bit_compute_dtype),
        bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant,
        llm_int8_skip_modules=q.skip_modules,
    )


def backend_label(cfg: Config, dtype: str) -> str:
    """What ran, for every output row: transformers/<dtype>/<attention>[/bnb-<mode>[-<quant type>]]."""
    q = cfg.model.quantization
    label = f"transformers/{dtype}/{cfg.model.attn_implementation}"
    if q.mode == "4bit":
        label += f"/bnb-4bit-{q.bnb_4bit_quant_type}-{q.bnb_4bit_compute_dtype}"
    elif q.mode == "8bit":
        label += "/bnb-8bit"
    return label


def normalised_levels(image_processor) -> np.ndarray:
    """[3, 256] float32: each uint8 level of each channel rescaled and normalised by the
    processor's own functions. Looking tiles up here gives its pixel_values to the bit (its
    float64 rescale included), where a float32 rescale on the device differs in the last bits
    -- enough to flip near-ties once a 4-bit model computes in bfloat16."""
    levels = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256))
    rescaled = image_processor.rescale(levels, image_processor.rescale_factor, input_data_format="channels_first")
    normed = image_processor.normalize(rescaled, image_processor.image_mean, image_processor.image_std,
                                       input_data_format="channels_first")
    return np.ascontiguousarray(normed[:, 0, :], dtype=np.float32)


class HFEngine(EngineLabels):
    """Loads the weights once; `generate` runs a batch, falling back to rows on a batch error."""

    def __init__(self, cfg: Config, checkpoint: Checkpoint):
        import torch
        import transformers

        self.cfg = cfg
        self.family = checkpoint.family
        self.device = resolve_device(cfg)
        self.dtype = resolve_dtype(cfg, self.device)
        threads = cfg.model.torch_threads or max(1, int(cfg.resources.model_cpus))
        if self.device == "cpu":
            torch.set_num_threads(threads)
        self.processor = checkpoint.processor
        self.tokenizer = self.processor.tokenizer
        model_cls = getattr(transformers, self.family.model_class)
        quantization = bnb_config(cfg)
        self.model = model_cls.from_pretrained(
            checkpoint.path,
            revision=checkpoint.revision,
            dtype=getattr(torch, self.dtype),
            attn_implementation=cfg.model.attn_implementation,
            quantization_config=quantization,
            # bitsandbytes places weights while loading; quantized models cannot be moved after.
            device_map={"": self.device},
        )
        self.model.eval()
        self._levels_np = normalised_levels(self.processor.image_processor)
        self._levels = torch.from_numpy(self._levels_np).to(self.device)
        self.eos_ids = set(np.atleast_1d(self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id).tolist())
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)
        super().__init__(checkpoint.name, backend_label(cfg, self.dtype))
        self._lock = threading.Lock()  # one generate at a time per model (Serve runs handlers concurrently)
        logger.info("loaded %s (%s) on %s as %s", self.model_name, self.family.name, self.device, self.backend)

    # -- inputs ---------------------------------------------------------------------------------
    def pixel_values(self, requests: list[PreparedRequest]):
        """uint8 tiles -> normalised float pixel_values on the model's device, as the processor would.

        LLaVA: [n_images, 3, H, W]; NeXT: [n_images, max_tiles, 3, H, W] zero-padded (the model
        unpads by image_sizes).
        """
        import torch

        per_image = []
        for r in requests:
            start = 0
            for n in r.tiles_per_image:
                per_image.append(r.tiles[start : start + n])
                start += n
        normed = self._normalised([r.tiles for r in requests]).to(getattr(torch, self.dtype))
        if self.family.name != "llava_next":
            return normed, None
        max_tiles = max(t.shape[0] for t in per_image)
        out = normed.new_zeros((len(per_image), max_tiles, *normed.shape[1:]))
        start = 0
        for i, t in enumerate(per_image):
            out[i, : t.shape[0]] = normed[start : start + t.shape[0]]
            start += t.shape[0]
        sizes = torch.tensor([s for r in requests for s in r.image_sizes], dtype=torch.long, device=self.device)
        return out, sizes

    def _normalised(self, tiles: list[np.ndarray]):
        """uint8 tiles -> float32 pixel values on the device, each level looked up in `_levels`.
        On CPU numpy reads the tiles where they lie and writes the result once (4x less CPU than
        the lookup by long indices below); on a GPU the uint8 tiles cross to it (4x fewer bytes
        than float) and are looked up there."""
        import torch

        if self.device == "cpu":
            out = np.empty((sum(len(t) for t in tiles), *tiles[0].shape[1:]), np.float32)
            start = 0
            for t in tiles:
                for c in range(3):
                    np.take(self._levels_np[c], t[:, c], out=out[start : start + len(t), c], mode="clip")
                start += len(t)
            return torch.from_numpy(out)
        on_device = torch.from_numpy(np.concatenate(tiles)).to(self.device)
        channels = torch.arange(3, device=self.device).view(1, 3, 1, 1)
        return self._levels[channels, on_device.long()]

    def _batch_inputs(self, requests: list[PreparedRequest]) -> dict:
        import torch

        longest = max(r.prompt_tokens for r in requests)
        ids = torch.full((len(requests), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), longest), dtype=torch.long)
        for i, r in enumerate(requests):  # left padding: generation continues from the last column
            ids[i, longest - r.prompt_tokens :] = torch.from_numpy(r.input_ids.astype(np.int64))
            mask[i, longest - r.prompt_tokens :] = 1
        pixel_values, image_sizes = self.pixel_values(requests)
        inputs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device), "pixel_values": pixel_values}
        if image_sizes is not None:
            inputs["image_sizes"] = image_sizes
        return inputs

    def _generate_kwargs(self, sampling: GenerationConfig) -> dict:
        kwargs = dict(
            max_new_tokens=sampling.max_new_tokens,
            min_new_tokens=sampling.min_new_tokens,
            pad_token_id=self.pad_id,
            do_sample=not sampling.greedy,
        )
        if sampling.greedy:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=None)
        if sampling.stop:
            kwargs.update(stop_strings=sampling.stop, tokenizer=self.tokenizer)
        return kwargs

    def close(self) -> None:
        """Drop the model's weights now (the process may live on: a replica being replaced)."""
        with self._lock:  # after any generation in flight
            if self.model is None:
                return
            self.model = None
        gc.collect()
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()
        logger.info("closed %s", self.model_name)

    # -- generation -----------------------------------------------------------------------------
    def generate(self, requests: list[PreparedRequest], sampling: GenerationConfig) -> list[Result]:
        return generate_with_row_fallback(lambda batch: self._generate_batch(batch, sampling), requests)

    def _generate_batch(self, requests: list[PreparedRequest], sampling: GenerationConfig) -> list[Result]:
        import torch

        inputs = self._batch_inputs(requests)
        with self._lock, torch.inference_mode():
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            out = self.model.generate(**inputs, **self._generate_kwargs(sampling))
        new_tokens = out[:, inputs["input_ids"].shape[1] :].cpu().numpy()
        return [self._result(r, row, sampling) for r, row in zip(requests, new_tokens)]

    def _result(self, request: PreparedRequest, tokens: np.ndarray, sampling: GenerationConfig) -> Result:
        ids = tokens.tolist()
        ends = [i for i, t in enumerate(ids) if t in self.eos_ids]
        n = ends[0] + 1 if ends else len(ids)
        text = self.tokenizer.decode(tokens[:n], skip_special_tokens=True)
        text, stopped = truncate_at_stop(text, sampling.stop)
        if stopped and not ends:
            # A row its stop string ended while the batch ran on was padded from there with the
            # pad token (not EOS for the llava-hf tokenizers): the token that completed the stop
            # string has text, so the trailing pad run is padding, not generated tokens.
            while n and ids[n - 1] == self.pad_id:
                n -= 1
        finish = "stop" if ends or stopped else "length"
        return Result(request.id, text, finish, request.prompt_tokens, request.image_tokens, n)

    def stream(self, request: PreparedRequest, sampling: GenerationConfig) -> Iterator[str | Result]:
        """Text deltas of one request as tokens arrive, then its `Result` (what `generate` returns).

        A generate thread hands token ids over a queue; each delta is the growth of the decoded
        text, minus a tail that may still change (trailing space, a partial character, the start
        of a stop string), so the deltas join to exactly `generate`'s text. Closing the iterator
        early (the client went away) aborts the generation at its next token.
        """
        import queue

        import torch
        from transformers.generation.streamers import BaseStreamer

        new_tokens: queue.Queue = queue.Queue()
        closed = threading.Event()
        failure: list[BaseException] = []

        class TokenQueue(BaseStreamer):
            prompt_seen = False

            def put(self, value):  # first the prompt ids [1, L], then each new token [1]
                if closed.is_set():
                    raise InterruptedError("stream closed by its consumer")
                if self.prompt_seen:
                    new_tokens.put(value.reshape(-1).tolist())
                self.prompt_seen = True

            def end(self):
                pass

        def run():
            try:
                with self._lock, torch.inference_mode():
                    if closed.is_set():  # the consumer left while this waited for the model
                        return
                    if sampling.seed is not None:
                        torch.manual_seed(sampling.seed)
                    self.model.generate(**inputs, **self._generate_kwargs(sampling), streamer=TokenQueue())
            except InterruptedError:  # our own stop: dropped here, with its traceback (which holds
                pass  # the generation's frames and KV cache), not kept alive until a GC cycle
            except BaseException as e:  # re-raised to the consumer below
                failure.append(e)
            finally:
                new_tokens.put(None)

        def settled(text: str) -> str:
            hold = max((k for stop in sampling.stop for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
            return text[: min(len(text) - hold, len(text.rstrip(" \t\r\n\ufffd")))]

        inputs = self._batch_inputs([request])
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        ids: list[int] = []
        sent = ""
        try:
            while (batch := new_tokens.get()) is not None:
                ids.extend(batch)
                text = settled(self._result(request, np.asarray(ids, dtype=np.int64), sampling).text)
                if len(text) > len(sent):
                    yield text[len(sent) :]
                    sent = text
        finally:
            closed.set()
            thread.join()
        if failure:
            raise failure[0]
        result = self._result(request, np.asarray(ids, dtype=np.int64), sampling)
        if len(result.text) > len(sent):
            yield result.text[len(sent) :]
        yield result
