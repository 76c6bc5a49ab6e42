"""Preprocessor: uint8 tiles, conversations, limits -- no Ray."""

import io

import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image, ImageOps
from PIL.JpegImagePlugin import JpegImageFile

from pipeline.config import load_config
from pipeline.errors import ImageError, InputError, MessagesError, PromptTooLong
from pipeline.images import decode_image
from pipeline.preprocess import build_conversation
from pipeline.records import Record
from tests.conftest import encode, hf_engine, photo, preprocessor, resized, saved
from tests.photos import encoded, picture, processor_tiles, tile_differences


def _cfg(ckpt, **extra):
    return load_config({"model": {"name": ckpt}, "generation": {"max_new_tokens": 8}, **extra})


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_llava_next"])
@pytest.mark.parametrize("size", [(480, 640), (300, 900), (37, 1500), (1024, 768)])
def test_uint8_tiles_normalised_on_model_side_equal_processor_pixel_values(request, family, size):
    ckpt = request.getfixturevalue(family)
    cfg = _cfg(ckpt)
    pre = preprocessor(cfg)
    image = resized("astronaut", *size)
    prepared = pre.prepare(Record(id=1, images=[image], prompt="hi"))
    assert prepared.tiles.dtype == np.uint8
    engine = hf_engine(cfg)
    ours, sizes = engine.pixel_values([prepared])

    processor = tf.AutoProcessor.from_pretrained(ckpt)
    pil = Image.open(io.BytesIO(image)).convert("RGB")
    theirs = processor(images=[pil], text="<image>", return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape
    assert torch.equal(ours, theirs)  # to the bit: a last-bit difference flips 4-bit/bfloat16 near-ties
    if sizes is not None:
        assert sizes.tolist() == [[size[0], size[1]]]


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_llava_next"])
def test_prepared_tiles_are_a_quarter_of_the_processors_float_pixel_values(request, family):
    ckpt = request.getfixturevalue(family)
    image = resized("coffee", 480, 640)
    prepared = preprocessor(_cfg(ckpt)).prepare(Record(id=1, images=[image], prompt="hi"))
    processor = tf.AutoProcessor.from_pretrained(ckpt)
    theirs = processor(images=[Image.open(io.BytesIO(image))], text=prepared.prompt, return_tensors="np")
    pixel_values = theirs["pixel_values"].reshape(-1, *prepared.tiles.shape[1:])  # NeXT: [1, tiles, ...]
    assert prepared.tiles.shape == pixel_values.shape and prepared.tiles.shape[1:] == (3, 336, 336)
    assert prepared.tiles.nbytes / pixel_values.nbytes == 0.25
    np.testing.assert_array_equal(prepared.input_ids, theirs["input_ids"][0])
    assert prepared.image_tokens == int((theirs["input_ids"][0] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum())


def test_conversation_from_prompt_messages_and_system():
    rec = Record(id=1, images=[b"x", b"y"], prompt="Compare.")
    msgs, sources = build_conversation(rec, "Be brief.", "default")
    assert msgs[0] == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    assert msgs[1]["content"] == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]
    assert sources == [b"x", b"y"]

    turns = '[{"role":"user","content":[{"type":"image"},{"type":"text","text":"What?"}]},' \
            '{"role":"assistant","content":"A cat."},{"role":"user","content":"Its colour?"}]'
    msgs, sources = build_conversation(Record(id=2, images=[b"z"], messages=turns), None, "default")
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[1]["content"] == [{"type": "text", "text": "A cat."}] and sources == [b"z"]

    with pytest.raises(MessagesError, match="not valid JSON"):
        build_conversation(Record(id=3, messages="[{"), None, "d")
    with pytest.raises(MessagesError, match="more 'image' parts than the row has images"):
        build_conversation(Record(id=4, messages='[{"role":"user","content":[{"type":"image"}]}]'), None, "d")
    with pytest.raises(MessagesError, match="role of system, user or assistant"):
        build_conversation(Record(id=5, messages='[{"role":"tool","content":"x"}]'), None, "d")


def test_multi_turn_prompt_uses_the_checkpoint_chat_template(tiny_llava):
    pre = preprocessor(_cfg(tiny_llava))
    turns = '[{"role":"user","content":[{"type":"image"},{"type":"text","text":"What?"}]},' \
            '{"role":"assistant","content":"A cat."},{"role":"user","content":"Its colour?"}]'
    prepared = pre.prepare(Record(id=1, images=[encode(photo("chelsea"))], messages=turns))
    assert prepared.prompt == "USER: <image>\nWhat? ASSISTANT: A cat. USER: Its colour? ASSISTANT:"


def test_limits_name_the_cause(tiny_llava):
    pre = preprocessor(_cfg(tiny_llava, limits={"max_pixels": 100_000, "max_prompt_tokens": 600}))
    big = encode(np.zeros((400, 400, 3), np.uint8))
    with pytest.raises(ImageError, match=r"image: 400x400 exceeds limits.max_pixels=100000"):
        pre.prepare(Record(id=1, images=[big]))
    with pytest.raises(ImageError, match=r"image: 2 images in one row; llava takes at most 1"):
        pre.prepare(Record(id=1, images=[resized("coffee", 50, 50)] * 2))
    with pytest.raises(PromptTooLong, match=r"prompt: \d+ tokens \(576 for images\) exceeds limits.max_prompt_tokens=600"):
        pre.prepare(Record(id=1, images=[resized("coffee", 50, 50)], prompt="word " * 200))
    with pytest.raises(InputError, match="^input: the row has no image$"):
        pre.prepare(Record(id=1, images=[], prompt="hi"))


def test_prompt_longer_than_context_is_a_row_error(tiny_llava):
    pre = preprocessor(_cfg(tiny_llava, generation={"max_new_tokens": 64}))
    with pytest.raises(PromptTooLong, match=r"\+ max_new_tokens 64 exceeds the model's context of 4096 tokens"):
        pre.prepare(Record(id=1, images=[resized("coffee", 50, 50)], prompt="astronaut " * 4000))


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_llava_next"])
@pytest.mark.parametrize("orientation, rotate", [(6, Image.Transpose.ROTATE_90), (3, Image.Transpose.ROTATE_180), (8, Image.Transpose.ROTATE_270)])
def test_exif_rotated_photo_gives_the_tiles_of_the_upright_one(request, family, orientation, rotate):
    """A camera stores the sensor's pixels and an EXIF Orientation tag; viewers (and the model)
    must see the photo upright."""
    upright = Image.open(io.BytesIO(resized("astronaut", 480, 640, "PNG"))).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation: how to turn the stored pixels to show them upright
    stored = io.BytesIO()
    upright.transpose(rotate).save(stored, "PNG", exif=exif)  # the sensor's view: rotated
    flat = io.BytesIO()
    upright.save(flat, "PNG")
    pre = preprocessor(_cfg(request.getfixturevalue(family)))
    a = pre.prepare(Record(id=1, images=[stored.getvalue()], prompt="hi"))
    b = pre.prepare(Record(id=1, images=[flat.getvalue()], prompt="hi"))
    assert a.image_sizes == b.image_sizes == [(480, 640)]
    np.testing.assert_array_equal(a.tiles, b.tiles)
    np.testing.assert_array_equal(a.input_ids, b.input_ids)


# Large photos: decoded at reduced scale (pipeline/pixels.py), compared with the processor on the
# fully decoded photo. Phone photos: 4032x3024 JPEG at quality 90.
PROMPT = "Describe this image in one sentence."


def _full_size_ids(pre, data: bytes, prompt: str) -> np.ndarray:
    full = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    return pre.processor(images=[full], text=prompt, return_tensors="np")["input_ids"][0]


def _assert_within_a_level_of_the_full_photo(pre, data: bytes, upright_hw):
    prepared = pre.prepare(Record(id=1, images=[data], prompt=PROMPT))
    theirs = processor_tiles(pre.processor.image_processor, data)
    means, _ = tile_differences(prepared.tiles, theirs)
    assert means.max() < 1.0, means
    assert not np.array_equal(prepared.tiles, theirs)  # reduced: not the full-size computation
    assert prepared.image_sizes == [upright_hw]  # the photo's own size: tokens and unpadding unchanged
    np.testing.assert_array_equal(prepared.input_ids, _full_size_ids(pre, data, prepared.prompt))
    return prepared


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_llava_next"])
def test_a_phone_jpeg_is_drafted_at_quarter_scale_and_its_tiles_stay_within_a_level_of_the_processors(request, family, monkeypatch):
    pre = preprocessor(_cfg(request.getfixturevalue(family)))
    data = encoded("astronaut", 3024, 4032)
    drafts = []
    real_draft = JpegImageFile.draft
    monkeypatch.setattr(JpegImageFile, "draft", lambda im, mode, size: drafts.append(size) or real_draft(im, mode, size))
    decoded = decode_image(data, pre.cfg.limits, pre.pixels.fits)
    assert drafts == [(1008, 756)] and decoded.scale == 4 and decoded.image.size == (1008, 756)
    _assert_within_a_level_of_the_full_photo(pre, data, (3024, 4032))


@pytest.mark.parametrize("family, scale", [("tiny_llava", 4), ("tiny_llava_next", 2)])
def test_a_large_png_is_box_reduced_and_its_tiles_stay_within_a_level_of_the_processors(request, family, scale):
    pre = preprocessor(_cfg(request.getfixturevalue(family)))
    data = encoded("coffee", 2048, 2048, "PNG")
    decoded = decode_image(data, pre.cfg.limits, pre.pixels.fits)
    assert decoded.scale == scale and decoded.image.size == (2048 // scale,) * 2
    _assert_within_a_level_of_the_full_photo(pre, data, (2048, 2048))


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_llava_next"])
def test_an_exif_rotated_phone_jpeg_is_reduced_as_the_upright_photo(request, family):
    """The scale is chosen on the upright size, and the tiles, sizes and tokens are the upright
    photo's: within a level of the processor on it, and of the same picture stored upright."""
    pre = preprocessor(_cfg(request.getfixturevalue(family)))
    upright = picture("rocket", 3024, 4032)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn the stored pixels 90 degrees clockwise to show them
    stored = saved(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=90, exif=exif)
    decoded = decode_image(stored, pre.cfg.limits, pre.pixels.fits)
    assert decoded.size == (3024, 4032) and decoded.image.size == (1008, 756) and decoded.scale == 4
    rotated = _assert_within_a_level_of_the_full_photo(pre, stored, (3024, 4032))
    flat = pre.prepare(Record(id=1, images=[saved(upright, "JPEG", quality=90)], prompt=PROMPT))
    np.testing.assert_array_equal(rotated.input_ids, flat.input_ids)
    means, _ = tile_differences(rotated.tiles, flat.tiles)
    assert means.max() < 1.0, means  # two JPEG encodings of one picture, not the same bytes


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_llava_next"])
def test_preprocess_exact_gives_the_processors_tiles_of_the_full_photo_bit_for_bit(request, family):
    ckpt = request.getfixturevalue(family)
    data = encoded("astronaut", 3024, 4032)
    exact = preprocessor(_cfg(ckpt, preprocess={"exact": True})).prepare(Record(id=1, images=[data], prompt=PROMPT))
    fast = preprocessor(_cfg(ckpt)).prepare(Record(id=1, images=[data], prompt=PROMPT))
    theirs = processor_tiles(tf.AutoProcessor.from_pretrained(ckpt).image_processor, data)
    np.testing.assert_array_equal(exact.tiles, theirs)
    assert not np.array_equal(fast.tiles, theirs)  # the default is the reduced decode
    np.testing.assert_array_equal(exact.input_ids, fast.input_ids)
    assert exact.image_sizes == fast.image_sizes == [(3024, 4032)] and exact.tiles_per_image == fast.tiles_per_image


# (h, w) of photos just under the size that would be reduced (2 x sqrt(2) the model's input in
# each direction), and just over it: the LLaVA-1.5 shortest edge 336; NeXT's 504x672 resize.
UNDER = {"tiny_llava": [(672, 896), (950, 1266), (1266, 950)], "tiny_llava_next": [(1008, 1344), (1424, 1898)]}
OVER = {"tiny_llava": (952, 1269), "tiny_llava_next": (1426, 1902)}


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_llava_next"])
def test_photos_up_to_2_8x_the_model_input_are_bit_identical_with_and_without_exact(request, family):
    ckpt = request.getfixturevalue(family)
    fast, exact = preprocessor(_cfg(ckpt)), preprocessor(_cfg(ckpt, preprocess={"exact": True}))
    for h, w in UNDER[family]:
        data = encoded("chelsea", h, w)
        assert decode_image(data, fast.cfg.limits, fast.pixels.fits).scale == 1
        a = fast.prepare(Record(id=1, images=[data], prompt=PROMPT))
        b = exact.prepare(Record(id=1, images=[data], prompt=PROMPT))
        np.testing.assert_array_equal(a.tiles, b.tiles)
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
    data = encoded("chelsea", *OVER[family])
    assert decode_image(data, fast.cfg.limits, fast.pixels.fits).scale == 2  # where reducing starts
