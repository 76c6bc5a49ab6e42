"""The vLLM backend's CPU half (no vLLM, no GPU): the working-size images vLLM gets, their token
counts, the greedy answer they give, and the config checks and install hint."""

import importlib.util
import io

import numpy as np
import pytest
from PIL import Image

from pipeline.checkpoint import Checkpoint
from pipeline.config import load_config
from pipeline.errors import PromptError
from pipeline.images import decode_image
from pipeline.pixels import Decoded
from pipeline.records import Record
from pipeline.vllm_inputs import encode_for_vllm, working_images
from tests.conftest import encode, hf_engine, preprocessor, resized

MAX_NEW = 16
# (photo, height, width): large photos, both orientations, a thin strip, one already small.
SIZES = [
    ("astronaut", 1024, 768),
    ("rocket", 768, 1024),
    ("coffee", 1500, 2000),
    ("chelsea", 900, 300),
    ("astronaut", 300, 900),
    ("camera", 1200, 1201),
    ("coffee", 37, 1500),
    ("chelsea", 240, 320),
]


def _cfg(ckpt, **extra):
    return load_config({"model": {"name": ckpt}, "generation": {"max_new_tokens": MAX_NEW}, **extra})


def _pil(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def _full(image: Image.Image) -> Decoded:
    """A photo decoded at full size."""
    return Decoded(image, (image.height, image.width))


def _pixels(pre, image):
    return pre.processor.image_processor(images=[image], do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"][0]


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_llava_next"])
@pytest.mark.parametrize("name, h, w", SIZES)
def test_working_image_gives_the_processor_the_same_pixels_and_tokens(request, family, name, h, w):
    pre = preprocessor(_cfg(request.getfixturevalue(family)))
    original = _pil(resized(name, h, w))
    prompt = "USER: <image>\nWhat is this? ASSISTANT:"
    req = encode_for_vllm(pre.checkpoint, "r", prompt, [_full(original)], pre.pixels)
    [small] = req.images
    assert small.dtype == np.uint8 and small.ndim == 3 and req.image_sizes == [small.shape[:2]]
    if h * w > 1_000_000:  # large photos shrink to the working size: 3x fewer bytes or better
        assert small.nbytes * 3 < h * w * 3

    ours, theirs = _pixels(pre, Image.fromarray(small)), _pixels(pre, original)
    if pre.family.name == "llava":  # the whole 336x336 input is bit-identical
        np.testing.assert_array_equal(ours, theirs)
    else:  # the grid tiles are bit-identical; the thumbnail is resampled from the working image
        assert ours.shape == theirs.shape
        np.testing.assert_array_equal(ours[1:], theirs[1:])
        assert np.abs(ours[0].astype(int) - theirs[0].astype(int)).mean() < 1.0

    # The token ids are the processor's own expansion, and the count is the original image's.
    expected = pre.processor(images=[Image.fromarray(small)], text=prompt, return_tensors="np")["input_ids"][0]
    np.testing.assert_array_equal(req.input_ids, expected)
    full = pre.processor(images=[original], text=prompt, return_tensors="np")["input_ids"][0]
    assert req.prompt_tokens == len(full)
    assert req.image_tokens == int((full == pre.image_token_id).sum())


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_llava_next"])
def test_downscaling_keeps_the_tokens_and_the_answer_as_far_as_the_pixels_allow(request, family):
    """transformers on the original photo vs on the image encode_for_vllm hands to vLLM, both
    from the photo as the Preprocessor decodes it (large ones at reduced scale)."""
    ckpt = request.getfixturevalue(family)
    cfg = _cfg(ckpt)
    pre, engine = preprocessor(cfg), hf_engine(cfg)
    originals, downscaled = [], []
    for i, (name, h, w) in enumerate(SIZES):
        data = resized(name, h, w)
        [small] = working_images(pre.pixels, [decode_image(data, cfg.limits, pre.pixels.fits)])
        prompt = f"Describe the {name}."
        originals.append(pre.prepare(Record(id=i, images=[data], prompt=prompt)))
        downscaled.append(pre.prepare(Record(id=i, images=[encode(small)], prompt=prompt)))  # PNG: lossless
    a = engine.generate(originals, cfg.generation)
    b = engine.generate(downscaled, cfg.generation)
    for size, x, y in zip(SIZES, a, b):
        assert x.error is None and x.completion_tokens > 0
        assert (x.prompt_tokens, x.image_tokens) == (y.prompt_tokens, y.image_tokens), size
    assert len({x.text for x in a}) == len(SIZES)  # the answers depend on the image: the comparison means something
    if pre.family.name == "llava":  # bit-identical model input: the same answer on every row
        assert [x.text for x in a] == [y.text for y in b]
    else:  # the thumbnail tile is resampled (module doc): a prompt-sensitive model may diverge
        first = cfg.generation.model_copy(update={"max_new_tokens": 1})
        agree = sum(x.text == y.text for x, y in zip(engine.generate(originals, first), engine.generate(downscaled, first)))
        assert agree >= len(SIZES) - 1, agree  # measured: 7 of 8 first tokens, 4 of 8 whole 16-token texts


def test_multi_image_row_counts_each_image(tiny_llava_next):
    pre = preprocessor(_cfg(tiny_llava_next))
    images = [_pil(resized("chelsea", 300, 451)), _pil(resized("coffee", 1500, 2000))]
    prompt = "[INST] <image>\n<image>\nCompare. [/INST]"
    req = encode_for_vllm(pre.checkpoint, "pair", prompt, [_full(im) for im in images], pre.pixels)
    expected = pre.processor(images=[Image.fromarray(a) for a in req.images], text=prompt, return_tensors="np")["input_ids"][0]
    np.testing.assert_array_equal(req.input_ids, expected)
    assert req.image_sizes == [(300, 451), req.images[1].shape[:2]] and req.images[1].shape[1] < 2000

    with pytest.raises(PromptError, match=r"prompt: 2 image placeholders for 1 image\(s\)"):
        encode_for_vllm(pre.checkpoint, "x", prompt, [_full(images[0])], pre.pixels)


def test_max_image_tokens(tiny_llava, tiny_llava_next):
    assert Checkpoint.load(_cfg(tiny_llava).model).images.max_tokens == 576
    # 576 (thumbnail) + 48x48 grid features + 48 row newlines for a 672x672 pinpoint.
    assert Checkpoint.load(_cfg(tiny_llava_next).model).images.max_tokens == 2928


needs_no_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")


@needs_no_vllm
def test_importing_the_vllm_engine_needs_no_vllm():
    from pipeline.engines import vllm_engine

    assert vllm_engine.VLLMEngine and vllm_engine.VLLMAsyncEngine
    with pytest.raises(ImportError):
        vllm_engine.VLLMEngine(load_config({"model": {"name": "m"}, "backend": "vllm"}), None)


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_llava_next"])
def test_a_phone_photo_decoded_reduced_gives_vllm_the_transformers_backends_tiles(request, family):
    """vLLM's processor on the working image made from the reduced decode computes the tiles
    the transformers backend sends (NeXT: the grid; its thumbnail is resampled), and counts the
    photo's own tokens."""
    pre = preprocessor(_cfg(request.getfixturevalue(family)))
    data = resized("coffee", 3024, 4032)
    decoded = decode_image(data, pre.cfg.limits, pre.pixels.fits)
    assert decoded.scale == 4
    prompt = "USER: <image>\nWhat is this? ASSISTANT:"
    req = encode_for_vllm(pre.checkpoint, "r", prompt, [decoded], pre.pixels)
    [small] = req.images
    ours, transformers_tiles = _pixels(pre, Image.fromarray(small)), pre.pixels.tiles(decoded)
    if pre.family.name == "llava":
        np.testing.assert_array_equal(ours, transformers_tiles[0])
    else:
        np.testing.assert_array_equal(ours[1:], transformers_tiles[1:])
        assert np.abs(ours[0].astype(int) - transformers_tiles[0].astype(int)).mean() < 1.0
    full = pre.processor(images=[_pil(data)], text=prompt, return_tensors="np")["input_ids"][0]
    assert req.prompt_tokens == len(full) and req.image_tokens == int((full == pre.image_token_id).sum())


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_llava_next"])
def test_exact_sends_vllm_every_image_as_decoded_at_full_size(request, family):
    """`preprocess.exact: true` on the vLLM backend: no reduced decode and no working size, so
    vLLM's processor gets the photo's own pixels; its token count is the processor's on the photo."""
    pre = preprocessor(_cfg(request.getfixturevalue(family), backend="vllm", preprocess={"exact": True}))
    assert pre.pixels is None
    data = resized("coffee", 1500, 2000)
    req = pre.prepare(Record(id="r", images=[data], prompt="What is this?"))
    [image] = req.images
    np.testing.assert_array_equal(image, np.asarray(_pil(data)))  # 1500 x 2000, as decoded
    full = pre.processor(images=[_pil(data)], text=req.prompt, return_tensors="np")["input_ids"][0]
    assert (req.prompt_tokens, req.image_tokens) == (len(full), int((full == pre.image_token_id).sum()))
