"""The tiny checkpoints themselves: real structure through from_pretrained, and answers that
depend on the prompt and on the image, so parity tests can see a dropped prompt or a swap."""

import itertools

import pytest

from pipeline.config import load_config
from pipeline.records import Record
from pipeline.tiny import build_tiny_checkpoint
from tests.conftest import hf_engine, preprocessor, resized

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field"]
PROMPTS = ["Hi?", "What is shown in the picture?", "Describe this image in one sentence.",
           "How many people are there in this photo of a dog and a cat outside?"]


def answers(ckpt: str) -> dict[tuple[str, str], str]:
    cfg = load_config({"model": {"name": ckpt}, "generation": {"max_new_tokens": 12}})
    pre, engine = preprocessor(cfg), hf_engine(cfg)
    images = {p: resized(p, 300, 400) for p in PHOTOS}
    requests = [pre.prepare(Record(id=(p, q), images=[images[p]], prompt=q)) for p in PHOTOS for q in PROMPTS]
    return {r.id: r.text for r in engine.generate(requests, cfg.generation)}


def sensitivity(out: dict) -> tuple[float, float]:
    """(share of prompt pairs whose answers differ on the same image,
        share of image pairs whose answers differ for the same prompt)."""
    by_prompt = [out[p, a] != out[p, b] for p in PHOTOS for a, b in itertools.combinations(PROMPTS, 2)]
    by_image = [out[a, q] != out[b, q] for q in PROMPTS for a, b in itertools.combinations(PHOTOS, 2)]
    return sum(by_prompt) / len(by_prompt), sum(by_image) / len(by_image)


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_llava_next"])
def test_answers_depend_on_the_prompt_and_on_the_image(request, family):
    prompt_share, image_share = sensitivity(answers(request.getfixturevalue(family)))
    assert prompt_share >= 0.8 and image_share >= 0.8, (prompt_share, image_share)


def test_plain_random_initialisation_would_not_see_the_prompt(tmp_path):
    """The control: without the attention gains the same check fails (what the gains fix)."""
    plain = build_tiny_checkpoint(tmp_path / "plain", "llava", attention_gain=1.0, value_gain=1.0)
    prompt_share, _ = sensitivity(answers(str(plain)))
    assert prompt_share < 0.5, prompt_share
