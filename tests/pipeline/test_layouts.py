"""Every checkpoint layout llava-ray claims to run (pipeline/layouts.py), built tiny with its real
config classes, image processor, special tokens and chat template: `check-config` describes it,
a job and an endpoint request answer it, text and token counts equal to transformers."""

import base64
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import transformers as tf

from pipeline.config import load_config
from pipeline.image_facts import ImageFacts
from pipeline.layouts import LAYOUTS
from pipeline.tiny import build_tiny_checkpoint
from tests.conftest import ROOT, cli_here, free_port, read_output, reference, resized, write_parquet

NAMES = [spec.short_name for spec in LAYOUTS.values()]
MAX_NEW = 10
KEY = "layout-key"
# Distinct photos (sizes and aspect ratios: distinct AnyRes grids) and prompts of distinct lengths.
ROWS = {
    "astronaut": (resized("astronaut", 300, 300), "What is the person wearing?"),
    "chelsea": (resized("chelsea", 300, 451), None),
    "coffee": (resized("coffee", 400, 600, "PNG"), "What drink is this? Answer in a few words please."),
    "rocket": (resized("rocket", 640, 240), "Describe it."),
}
# What the real checkpoints' processors give one image (llava-hf's files: 24x24 CLIP patches, 27x27
# SigLIP patches with no CLS kept; NeXT up to 2928 for its largest pinpoint).
TOKENS = {"llava-1.5-7b": 576, "llava-interleave-qwen-0.5b": 729}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    return {spec.short_name: str(build_tiny_checkpoint(root / spec.short_name, spec.hub_id)) for spec in LAYOUTS.values()}


@pytest.mark.parametrize("name", NAMES)
def test_each_layout_is_its_real_structure(checkpoints, name):
    spec = next(s for s in LAYOUTS.values() if s.short_name == name)
    config = tf.AutoConfig.from_pretrained(checkpoints[name])
    processor = tf.AutoProcessor.from_pretrained(checkpoints[name])
    assert config.model_type == spec.family
    assert config.text_config.model_type == spec.text["model_type"]
    assert config.vision_config.model_type == spec.vision["model_type"]
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (spec.vision["image_size"], 14)
    assert (config.vision_feature_select_strategy, config.vision_feature_layer) == (spec.vision_feature_select_strategy, spec.vision_feature_layer)
    assert config.text_config.max_position_embeddings == spec.text["max_position_embeddings"]
    assert type(processor.image_processor).__name__.removesuffix("Pil") == spec.image_processor[0]
    assert processor.chat_template == spec.chat_template
    assert processor.tokenizer.eos_token == spec.tokens.eos and processor.tokenizer.pad_token == spec.tokens.pad
    facts = ImageFacts.read(processor, spec.family, name)
    assert facts.max_tokens == TOKENS.get(name, 2928)


@pytest.mark.parametrize("name", NAMES)
def test_check_config_describes_the_layout(checkpoints, name):
    spec = next(s for s in LAYOUTS.values() if s.short_name == name)
    res = cli_here("check-config", str(ROOT / "configs" / "demo.yaml"), "--set", f"model.name={checkpoints[name]}")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    how = {"CLIPImageProcessor": "resize + centre crop", "SiglipImageProcessor": "squash", "LlavaNextImageProcessor": "AnyRes"}
    size = spec.vision["image_size"]
    assert lines[1] == f"family: {spec.family}  image processor: {spec.image_processor[0]}Pil ({how[spec.image_processor[0]]}, {size}x{size} tiles, patch 14)"
    per_image = f"{TOKENS[name]}" if name in TOKENS else "up to 2928 (AnyRes, by image size)"
    assert lines[2] == f"image tokens per image: {per_image}  context: {spec.text['max_position_embeddings']} tokens"


@pytest.fixture(scope="module")
def serve_port(ray_local):
    """One Serve instance for the layouts: each layout's application replaces the one before in
    place (`serve.run` under the same name, as a redeploy does), not deleted and made anew."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


def _data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_a_job_and_an_endpoint_request_on_each_layout_equal_transformers(ray_local, serve_port, checkpoints, name, tmp_path):
    from ray import serve

    from deployments.app import APP_NAME, build
    from pipeline.job import run_job

    ckpt = checkpoints[name]
    rows = [{"id": k, "image": img, "prompt": prompt} for k, (img, prompt) in ROWS.items()]
    cfg = load_config({
        "model": {"name": ckpt}, "generation": {"max_new_tokens": MAX_NEW},
        "input": {"path": write_parquet(tmp_path / "in.parquet", rows)}, "output": {"path": str(tmp_path / "out")},
        "resources": {"model_batch_size": 4, "preprocess_batch_size": 4, "rows_per_block": 4},
    })
    serve_cfg = load_config("configs/serve-tiny.yaml", overrides={
        "model.name": ckpt, "generation.max_new_tokens": MAX_NEW, "serve.port": serve_port,
        "serve.served_model_name": name, "serve.api_key": KEY})
    # This layout's application replaces the one before while the job runs (each start is mostly
    # one process importing torch: side by side they use both cores); serve.run returns once its
    # replicas serve.
    with ThreadPoolExecutor(1) as pool:
        deployed = pool.submit(serve.run, build(serve_cfg), name=APP_NAME, route_prefix="/")
        summary = run_job(cfg)
        deployed.result()
    out = read_output(cfg.output.path)
    assert set(out) == set(ROWS) and summary.rows_ok == len(ROWS)
    expected = {k: reference(ckpt, [img], prompt or cfg.prompt.default, MAX_NEW) for k, (img, prompt) in ROWS.items()}
    for key, ref in expected.items():
        row = out[key]
        assert row["error"] is None, (key, row["error"])
        got = (row["text"], row["prompt_tokens"], row["image_tokens"], row["completion_tokens"])
        assert got == (ref.text, ref.prompt_tokens, ref.image_tokens, ref.completion_tokens), key
    assert len({ref.prompt_tokens for ref in expected.values()}) == len(ROWS)  # distinct prompts reached the model
    assert len({ref.text for ref in expected.values()}) > 1

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{serve_port}/v1", api_key=KEY, max_retries=0, timeout=120)
    assert [m.id for m in client.models.list()] == [name]  # this layout's application, not the one before
    for key in ("astronaut", "coffee"):
        image, prompt = ROWS[key]
        reply = client.chat.completions.create(model=name, max_tokens=MAX_NEW, temperature=0, messages=[{
            "role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_uri(image)}},
                                        {"type": "text", "text": prompt}]}])
        ref = expected[key]
        assert reply.choices[0].message.content == ref.text == out[key]["text"]
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (ref.prompt_tokens, ref.completion_tokens)


def test_llava_interleave_takes_several_images_in_one_row_and_llava_1_5_one(checkpoints):
    """The per-row image limit comes from the checkpoint: llava-interleave (LLaVA with SigLIP and
    Qwen2) answers a row of three images as transformers does; LLaVA-1.5 keeps one."""
    from pipeline.records import Record
    from tests.conftest import hf_engine, preprocessor

    images = [ROWS[k][0] for k in ("astronaut", "chelsea", "rocket")]
    prompt = "What do these three pictures have in common?"
    cfg = load_config({"model": {"name": checkpoints["llava-interleave-qwen-0.5b"]}, "generation": {"max_new_tokens": MAX_NEW}})
    pre = preprocessor(cfg)
    assert pre.max_images == 4  # the checkpoint's 8, capped by limits.max_images_per_row
    [result] = hf_engine(cfg).generate([pre.prepare(Record(id="three", images=images, prompt=prompt))], cfg.generation)
    ref = reference(cfg.model.name, images, prompt, MAX_NEW)
    assert (result.text, result.prompt_tokens, result.image_tokens, result.completion_tokens) == (
        ref.text, ref.prompt_tokens, ref.image_tokens, ref.completion_tokens)
    assert ref.image_tokens == 3 * 729

    one = preprocessor(load_config({"model": {"name": checkpoints["llava-1.5-7b"]}}))
    from pipeline.errors import LimitsError

    with pytest.raises(LimitsError, match=r"^image: 2 images in one row; llava takes at most 1 "):
        one.prepare(Record(id="two", images=images[:2], prompt=prompt))


def test_presets_and_tiny_names_resolve(tmp_path, monkeypatch):
    """`model.name` as a preset is its llava-hf hub id (every layout's short name, and the larger
    sizes of a listed layout); `tiny-<short name>` is that layout built tiny into the cache."""
    from pipeline.checkpoint import resolve_model_name

    for spec in LAYOUTS.values():
        assert resolve_model_name(spec.short_name) == spec.hub_id
    assert resolve_model_name("llava-v1.6-vicuna-13b") == "llava-hf/llava-v1.6-vicuna-13b-hf"
    assert resolve_model_name("my-org/my-llava") == "my-org/my-llava"  # anything else is a hub id or a path
    monkeypatch.setenv("LLAVA_RAY_CACHE", str(tmp_path))
    path = resolve_model_name("tiny-llava-interleave-qwen-0.5b")
    assert path == str(tmp_path / "tiny-llava-interleave-qwen-0.5b")
    config = tf.AutoConfig.from_pretrained(path)
    assert (config.text_config.model_type, config.vision_config.model_type) == ("qwen2", "siglip_vision_model")
