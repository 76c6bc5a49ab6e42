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


def test_actors_starting_together_build_the_demo_checkpoint_once(tmp_path):
    """Three processes ask for the same tiny checkpoint in an empty cache at once (as actors of a
    fresh job do): all get it, whole (it loads through from_pretrained), and no half-built
    folder is left. Without the lock, the builds race and the later renames fail."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = "from pipeline.tiny import ensure_tiny; print(ensure_tiny('tiny-llava'))"
    env = {**os.environ, "LLAVA_RAY_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in results]
    assert {out.strip() for out, _ in results} == {str(tmp_path / "tiny-llava")}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tiny-llava.lock", "tiny-llava"]  # no temporary folder left
    from transformers import LlavaForConditionalGeneration

    assert LlavaForConditionalGeneration.from_pretrained(tmp_path / "tiny-llava").config.model_type == "llava"
