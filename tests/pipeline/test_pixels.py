"""pipeline/pixels.py against transformers' image processors, on every layout the project runs:
LLaVA-1.5 with a CLIP 336 / 384 or SigLIP 384 tower, LLaVA-NeXT with 336 / 384 pinpoints."""

import dataclasses

import numpy as np
import pytest
import transformers as tf

from pipeline.checkpoint import Checkpoint
from pipeline.config import LimitsConfig, load_config
from pipeline.images import decode_image
from pipeline.errors import ConfigError
from pipeline.image_facts import ImageFacts
from pipeline.pixels import AnyResPixels, pixels_for
from pipeline.preprocess import Preprocessor
from pipeline.records import Record
from pipeline.layouts import NEXT_PINPOINTS
from tests.photos import encoded, processor_tiles, tile_differences

LIMITS = LimitsConfig()


def _square(n):
    return {"height": n, "width": n}


# name -> (family, image processor)
LAYOUTS = {
    "clip-336": ("llava", lambda: tf.CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size=_square(336))),
    "clip-384": ("llava", lambda: tf.CLIPImageProcessorPil(size={"shortest_edge": 384}, crop_size=_square(384))),
    "siglip-384": ("llava", lambda: tf.SiglipImageProcessorPil(size=_square(384))),  # squashed, no crop
    "anyres-336": ("llava_next", lambda: tf.LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size=_square(336), image_grid_pinpoints=NEXT_PINPOINTS)),
    "anyres-384": ("llava_next", lambda: tf.LlavaNextImageProcessorPil(
        size={"shortest_edge": 384}, crop_size=_square(384),
        image_grid_pinpoints=[[384 * h, 384 * w] for h, w in [(1, 2), (2, 1), (2, 2), (3, 1), (1, 3), (2, 3), (3, 2), (3, 3)]])),
}


@pytest.fixture(scope="module")
def tokenizer(tiny_llava):
    return tf.AutoTokenizer.from_pretrained(tiny_llava)


def _wrap(family, image_processor, tokenizer):
    cls = tf.LlavaNextProcessor if family == "llava_next" else tf.LlavaProcessor
    return cls(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
               vision_feature_select_strategy="default", num_additional_image_tokens=1)


def _processor(layout, tokenizer):
    family, image_processor = LAYOUTS[layout]
    return family, _wrap(family, image_processor(), tokenizer)


def _pixels(family, processor):
    return pixels_for(ImageFacts.read(processor, family, "test"))


def _small_sizes():
    rng = np.random.default_rng(0)
    return [(480, 640), (1024, 768), (336, 336), (37, 1500), (1500, 37), (60, 80)] + [tuple(int(v) for v in rng.integers(16, 940, 2)) for _ in range(24)]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_tiles_of_photos_under_2_8x_the_model_input_are_the_processors_bit_for_bit(layout, tokenizer):
    family, processor = _processor(layout, tokenizer)
    pixels = _pixels(family, processor)
    for h, w in _small_sizes():
        data = encoded("astronaut", h, w)
        decoded = decode_image(data, LIMITS, pixels.fits)
        assert decoded.scale == 1, (h, w)
        np.testing.assert_array_equal(pixels.tiles(decoded), processor_tiles(processor.image_processor, data), err_msg=str((h, w)))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("h, w, fmt", [(2160, 3840, "JPEG"), (3024, 4032, "JPEG"), (4032, 3024, "JPEG"), (3024, 4032, "PNG")])
def test_large_photos_are_decoded_reduced_within_a_level_of_the_processor_on_the_full_photo(layout, h, w, fmt, tokenizer):
    family, processor = _processor(layout, tokenizer)
    pixels = _pixels(family, processor)
    data = encoded("hubble_deep_field", h, w, fmt)  # point sources: the hardest scikit-image photo to resample
    decoded = decode_image(data, LIMITS, pixels.fits)
    assert decoded.scale > 1 and decoded.size == (h, w)
    means, _ = tile_differences(pixels.tiles(decoded), processor_tiles(processor.image_processor, data))
    assert means.max() < 1.0, means


def test_anyres_reduces_less_rather_than_change_what_vllm_would_compute_from_the_reduced_image(tiny_llava_next):
    """3024x1021 halved is 1512x511: resized into the 1008x336 pinpoint as 995 rows, not the
    photo's 996. vLLM would count and cut that image differently, so it is decoded in full."""
    processor = tf.AutoProcessor.from_pretrained(tiny_llava_next)
    pixels = _pixels("llava_next", processor)
    assert pixels.plan((3024, 1021)) == ((1008, 336), (996, 336)) and pixels.plan((1512, 511))[1] == (995, 336)
    data = encoded("rocket", 3024, 1021)
    decoded = decode_image(data, LIMITS, pixels.fits)
    assert decoded.scale == 1
    np.testing.assert_array_equal(pixels.tiles(decoded), processor_tiles(processor.image_processor, data))
    assert decode_image(encoded("rocket", 3024, 1022), LIMITS, pixels.fits).scale == 2  # its neighbour halves fine


@pytest.mark.parametrize("image_processor, why", [
    (tf.CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size=_square(400)), "it pads"),
    (tf.LlavaNextImageProcessorPil(size={"shortest_edge": 384}, crop_size=_square(336), image_grid_pinpoints=NEXT_PINPOINTS), "resized or cropped again"),
    (tf.LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size=_square(336), image_grid_pinpoints=[[336, 500]]), "not a multiple"),
])
def test_a_processor_whose_steps_are_not_reproduced_gets_no_fast_path(image_processor, why, tokenizer, caplog):
    family = "llava_next" if isinstance(image_processor, tf.LlavaNextImageProcessorPil) else "llava"
    with caplog.at_level("INFO", logger="pipeline.pixels"):
        assert _pixels(family, _wrap(family, image_processor, tokenizer)) is None
    assert why in caplog.text


class OwnCLIPImageProcessor(tf.CLIPImageProcessorPil):
    """A checkpoint's own subclass: its steps may differ, so nothing here assumes them."""


@pytest.mark.parametrize("image_processor, message", [
    (OwnCLIPImageProcessor(size={"shortest_edge": 336}, crop_size=_square(336)), "has image processor OwnCLIPImageProcessor; llava-ray knows"),
    (tf.CLIPImageProcessorPil(size={"shortest_edge": 336, "longest_edge": 500}, crop_size=_square(336)), "is neither a shortest edge nor a height x width"),
    (tf.CLIPImageProcessorPil(size={"shortest_edge": 336}, do_center_crop=False), "resizes to a shortest edge without a crop"),
])
def test_a_processor_llava_ray_does_not_know_is_a_config_error_naming_the_model(image_processor, message, tokenizer):
    with pytest.raises(ConfigError) as e:
        ImageFacts.read(_wrap("llava", image_processor, tokenizer), "llava", "own/model")
    assert str(e.value).startswith("model.name: 'own/model'") and message in str(e.value) and "\n" not in str(e.value)


def test_without_a_fast_path_the_preprocessor_runs_the_processor_on_the_full_photo(tiny_llava, tokenizer):
    cfg = load_config({"model": {"name": tiny_llava}})
    checkpoint = Checkpoint.load(cfg.model)
    own = tf.LlavaProcessor(image_processor=tf.CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size=_square(400)),
                            tokenizer=checkpoint.processor.tokenizer, patch_size=14, vision_feature_select_strategy="default",
                            num_additional_image_tokens=1, chat_template=checkpoint.processor.chat_template)
    pre = Preprocessor(cfg, dataclasses.replace(checkpoint, processor=own, images=ImageFacts.read(own, "llava", "own")))
    assert pre.pixels is None
    data = encoded("astronaut", 3024, 4032)
    prepared = pre.prepare(Record(id=1, images=[data], prompt="hi"))
    np.testing.assert_array_equal(prepared.tiles, processor_tiles(own.image_processor, data))
    assert prepared.image_tokens == (400 // 14) ** 2  # its own 400-pixel crop, counted by the facts


def test_the_anyres_thumbnail_size_is_read_as_the_processor_reads_it(tokenizer):
    def thumbnail(size):
        ip = tf.LlavaNextImageProcessorPil(size=size, crop_size=_square(336), image_grid_pinpoints=NEXT_PINPOINTS)
        return AnyResPixels.thumbnail(ImageFacts.read(_wrap("llava_next", ip, tokenizer), "llava_next", "t"))

    assert thumbnail({"shortest_edge": 336}) == (336, 336)
    assert thumbnail({"height": 384, "width": 384}) == (384, 384)
