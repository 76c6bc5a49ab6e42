"""Preprocessor: record -> PreparedRequest, the CPU half shared by the job and the endpoint.

Plain class, no Ray: decode and check images (large photos at reduced scale, pipeline/pixels.py),
build the conversation, apply the checkpoint's own chat template, tokenise with image-token
expansion, and keep AnyRes tiles as uint8 (the model side rescales and normalises, so 4x fewer
bytes cross the object store).
"""

from __future__ import annotations

import contextlib
import json
import threading
from typing import Any, Callable

import numpy as np

from .checkpoint import Checkpoint
from .config import Config
from .errors import ImageError, InputError, LimitsError, MessagesError, PromptError, PromptTooLong
from .images import decode_image, load_bytes, read_header
from .pixels import Decoded, pixels_for
from .records import PreparedRequest, Record, TokenCount
from .vllm_inputs import encode_for_vllm, expanded_ids


def _text_part(part: dict[str, Any]) -> dict[str, Any]:
    text = part.get("text")
    if not isinstance(text, str):
        raise MessagesError("a 'text' part needs a string 'text'")
    return {"type": "text", "text": text}


def build_conversation(record: Record, system: str | None, default_prompt: str) -> tuple[list[dict], list]:
    """OpenAI-style input -> (HF chat-template messages, image sources in placeholder order).

    `image_url` parts carry their own source; bare `image` parts take the row's images in order.
    """
    if record.messages is None:
        content = [{"type": "image"} for _ in record.images]
        content.append({"type": "text", "text": record.prompt if record.prompt is not None else default_prompt})
        messages, sources = [{"role": "user", "content": content}], list(record.images)
    else:
        raw = record.messages
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as e:
                raise MessagesError(f"not valid JSON ({e.msg} at char {e.pos})") from None
        if not isinstance(raw, list) or not raw:
            raise MessagesError("expected a non-empty list of {role, content} objects")
        row_images = iter(record.images)
        messages, sources = [], []
        for i, msg in enumerate(raw):
            if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant"):
                raise MessagesError(f"turn {i}: needs a role of system, user or assistant")
            content = msg.get("content")
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(parts, list):
                raise MessagesError(f"turn {i}: content must be a string or a list of parts")
            converted = []
            for part in parts:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    converted.append(_text_part(part))
                elif kind == "image_url":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    if not isinstance(url, str) or not url:
                        raise MessagesError(f"turn {i}: an 'image_url' part needs image_url.url")
                    converted.append({"type": "image"})
                    sources.append(url)
                elif kind == "image":
                    source = next(row_images, None)
                    if source is None:
                        raise MessagesError(f"turn {i}: more 'image' parts than the row has images")
                    converted.append({"type": "image"})
                    sources.append(source)
                else:
                    raise MessagesError(f"turn {i}: unsupported part type {kind!r}; use text, image_url or image")
            messages.append({"role": msg["role"], "content": converted})
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    return messages, sources


class Preprocessor:
    """record -> PreparedRequest for one checkpoint. `local_ok=False` for the online endpoint."""

    def __init__(self, cfg: Config, checkpoint: Checkpoint, *, local_ok: bool = True, threads: int | None = None):
        """`threads`: at most this many rows decode and tile at once (the CPU actor's CPUs), while
        any number may wait on their image bytes; None: no bound."""
        self.cfg = cfg
        self.checkpoint = checkpoint
        self.local_ok = local_ok
        self.family = checkpoint.family
        self.processor = checkpoint.processor
        self.context_len = cfg.context_limit(checkpoint.context_len)  # vLLM's own refusals: here, per row
        self.image_token_id = checkpoint.image_token_id
        self.max_images = cfg.images_per_row(checkpoint.max_images)
        # No token is longer than the vocabulary's longest: text beyond context x that many
        # characters cannot fit, and is refused before tokenising (a 25 MB prompt costs seconds).
        longest = max(len(t) for t in self.processor.tokenizer.get_vocab())
        self.max_text_chars = self.context_len * longest
        self.pixels = None if cfg.preprocess.exact else pixels_for(checkpoint.images)
        self.cpu = threading.BoundedSemaphore(threads) if threads else contextlib.nullcontext()

    def prepare(self, record: Record, max_new_tokens: int | None = None) -> PreparedRequest:
        """Raise a RowError (ImageError, MessagesError, PromptError; message = the row's error)."""
        fits = self.pixels.fits if self.pixels else None
        request = self._through(record, lambda data: decode_image(data, self.cfg.limits, fits), self._request)
        self.check_length(request, max_new_tokens)
        return request

    def count(self, record: Record) -> TokenCount:
        """What `prepare` would give the model, from the images' headers alone (`llava-ray plan`):
        the same checks, template and token ids, no pixel decoded. The length check is left to
        `check_length`, so a row over the context still has its count."""
        return self._through(record, lambda data: read_header(data, self.cfg.limits), self._count)

    def _through(self, record: Record, open_image: Callable[[bytes], Any], encode: Callable[[Any, str, list], Any]):
        """The one path of `prepare` and `count`: conversation and its checks, image bytes,
        each image opened (`open_image`: decoded, or its header), the chat template, `encode`."""
        cfg = self.cfg
        messages, sources = build_conversation(record, cfg.prompt.system, cfg.prompt.default)
        texts = [p["text"] for m in messages for p in m["content"] if p["type"] == "text"]
        chars = sum(len(t) for t in texts)
        if chars > self.max_text_chars:
            raise PromptTooLong(f"{chars} characters of text cannot fit the model's context of {self.context_len} tokens")
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate, as a JSON "\ud800" escape gives
                raise PromptError("the text holds an unpaired UTF-16 surrogate, which is not a character") from None
        if not sources:
            raise InputError("the row has no image")
        if len(sources) > self.max_images:
            raise LimitsError(
                f"{len(sources)} images in one row; {self.family.name} takes at most {self.max_images} "
                f"(limits.max_images_per_row={cfg.limits.max_images_per_row})"
            )
        encoded = [load_bytes(s, cfg.limits, cfg.fetch, cfg.storage, local_ok=self.local_ok) for s in sources]
        with self.cpu:
            images = [open_image(data) for data in encoded]
            try:
                prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as e:  # the template's own raise_exception (e.g. an unsupported role order)
                raise MessagesError(f"the chat template rejected the conversation: {e}") from None
            placeholder = self.processor.image_token
            if prompt.count(placeholder) != len(images):  # the text itself holds the placeholder
                raise PromptError(f"the text must not contain the image placeholder {placeholder!r}")
            return encode(record.id, prompt, images)

    def _request(self, request_id: Any, prompt: str, images: list[Decoded]) -> PreparedRequest:
        if self.cfg.backend == "vllm":
            return encode_for_vllm(self.checkpoint, request_id, prompt, images, self.pixels)
        return self._encode(request_id, prompt, images)

    def _count(self, request_id: Any, prompt: str, sizes: list[tuple[int, int]]) -> TokenCount:
        """Token ids from the photos' upright sizes. (vLLM gets some images at a working size,
        chosen only where it keeps the token count: pipeline/vllm_inputs.py.)"""
        input_ids, image_tokens = expanded_ids(self.checkpoint, prompt, sizes)
        return TokenCount(request_id, sizes, self.checkpoint.images.tiles(sizes), len(input_ids), image_tokens)

    def _encode(self, request_id: Any, prompt: str, images: list[Decoded]) -> PreparedRequest:
        sizes = [d.size for d in images]  # of the photos: the model unpads AnyRes features by them
        input_ids, image_tokens = expanded_ids(self.checkpoint, prompt, sizes)
        per_image = [self.pixels.tiles(d) for d in images] if self.pixels else self._processor_tiles(images)
        return PreparedRequest(
            id=request_id,
            prompt=prompt,
            input_ids=input_ids,
            image_tokens=image_tokens,
            tiles=per_image[0] if len(per_image) == 1 else np.concatenate(per_image),  # [total, 3, 336, 336] uint8
            tiles_per_image=[len(t) for t in per_image],
            image_sizes=sizes,
        )

    def _processor_tiles(self, images: list[Decoded]) -> list[np.ndarray]:
        """The checkpoint's image processor on the full images (preprocess.exact), each image's
        tiles as uint8: do_rescale/do_normalize off, it returns them resized, cropped and tiled."""
        ip = self.processor.image_processor
        try:
            pixels = ip(images=[d.image for d in images], return_tensors="np", do_rescale=False, do_normalize=False)["pixel_values"]
        except Exception as e:  # the checkpoint's own processor refused what decoded fine
            raise ImageError(f"the checkpoint's processor cannot take this image: {type(e).__name__}: {e}") from None
        pixels = pixels.astype(np.uint8, copy=False)
        if pixels.ndim == 4:  # [n_images, 3, H, W]
            return [p[None] for p in pixels]
        # AnyRes: [n_images, max_tiles, 3, H, W], padded to the row's max
        counts = self.checkpoint.images.tiles([d.size for d in images])
        return [pixels[i, :n] for i, n in enumerate(counts)]

    def check_length(self, request: PreparedRequest | TokenCount, max_new_tokens: int | None = None) -> None:
        """PromptTooLong when the prompt and `max_new_tokens` (generation's by default) cannot fit."""
        max_new_tokens = max_new_tokens or self.cfg.generation.max_new_tokens
        n = request.prompt_tokens
        limit = self.cfg.limits.max_prompt_tokens
        if limit is not None and n > limit:
            raise PromptTooLong(f"{n} tokens ({request.image_tokens} for images) exceeds limits.max_prompt_tokens={limit}")
        if n + max_new_tokens > self.context_len:
            raise PromptTooLong(
                f"{n} tokens ({request.image_tokens} for images) + max_new_tokens {max_new_tokens} "
                f"exceeds the model's context of {self.context_len} tokens"
            )
