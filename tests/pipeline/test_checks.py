"""The start-up checks: setting combinations (config validators) and what this machine must have
(pipeline/checks.py), each a one-line ConfigError naming the key, at check-config and job start."""

import importlib.util

import pytest

from pipeline.checkpoint import Checkpoint
from pipeline.checks import check_environment, check_vllm_settings
from pipeline.config import load_config
from pipeline.errors import ConfigError
from tests.conftest import cli, cli_here

MAX_NEW = 16


def _cfg(ckpt, **extra):
    return load_config({"model": {"name": ckpt}, "generation": {"max_new_tokens": MAX_NEW}, **extra})


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"backend": "vllm", "model": {"name": "m", "quantization": {"mode": "4bit"}}},
         "model.quantization.mode: bitsandbytes 4/8-bit runs on backend 'transformers' only; set model.quantization.mode=none for vllm"),
        ({"backend": "vllm", "model": {"name": "m", "quantization": {"mode": "8bit"}}},
         "model.quantization.mode: bitsandbytes 4/8-bit runs on backend 'transformers' only"),
        ({"model": {"name": "m", "attn_implementation": "flash_attention_2", "device": "cpu"}},
         "model.attn_implementation: flash_attention_2 needs a GPU; use sdpa on CPU"),
        ({"model": {"name": "m", "quantization": {"mode": "3bit"}}}, "model.quantization.mode: Input should be 'none', '4bit' or '8bit'"),
    ],
)
def test_impossible_combinations_fail_at_config_check(settings, message):
    with pytest.raises(ConfigError) as e:
        load_config(settings)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)  # the key comes first


@pytest.mark.cpu_only
def test_flash_attention_without_gpu_fails_check_config(tiny_llava):
    # a process of its own: in one with a Ray already up the checks are a cluster's, not this machine's
    res = cli("check-config", "configs/demo.yaml", "--set", f"model.name={tiny_llava}", "--set", "model.attn_implementation=flash_attention_2")
    assert res.returncode == 2
    assert res.stderr.strip() == "config error: model.attn_implementation: flash_attention_2 needs a CUDA GPU; use sdpa"


def test_custom_resources_without_a_cluster_fail_check_config(tiny_llava):
    res = cli("check-config", "configs/demo.yaml", "--set", f"model.name={tiny_llava}",  # no Ray up: embedded
              "--set", 'resources.model_resources={"model_node": 1}')
    assert res.returncode == 2
    assert res.stderr.strip() == ("config error: resources.model_resources: custom resources need a Ray cluster whose nodes "
                                  "declare them (RAY_ADDRESS); an embedded Ray has none, so the pool would never start")


def _vllm_cfg(ckpt, **extra):
    base = {"backend": "vllm", "resources": {"num_gpus_per_actor": 1}, "vllm": {"limit_mm_per_prompt": 4}}
    for key, value in extra.items():
        base[key] = {**base.get(key, {}), **value}
    return _cfg(ckpt, **base)


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"resources": {"num_gpus_per_actor": 0}},
         "resources.num_gpus_per_actor: 0, but backend 'vllm' runs one engine per model actor on "
         "vllm.tensor_parallel_size=1 whole GPU(s); set resources.num_gpus_per_actor=1"),
        ({"vllm": {"limit_mm_per_prompt": 1}},
         "vllm.limit_mm_per_prompt: 1, but rows may hold 4 images (llava_next, limits.max_images_per_row=4); "
         "set vllm.limit_mm_per_prompt=4 or limits.max_images_per_row=1"),
        ({"vllm": {"max_model_len": 40000}},  # Mistral's 32768, as llava-v1.6-mistral-7b's config says
         "vllm.max_model_len: 40000 exceeds the model's context of 32768 tokens; set vllm.max_model_len=32768 or less"),
        ({"vllm": {"max_model_len": 2048}},
         "vllm.max_model_len: 2048 cannot hold one llava_next image (2928 tokens at most) + "
         "generation.max_new_tokens=16; set vllm.max_model_len to at least 2944 plus the prompt's text, "
         "or lower generation.max_new_tokens"),
    ],
)
def test_vllm_settings_that_cannot_work_are_one_line_errors(tiny_llava_next, extra, message):
    cfg = _vllm_cfg(tiny_llava_next, **extra)
    with pytest.raises(ConfigError) as e:
        check_vllm_settings(cfg, Checkpoint.load(cfg.model))
    assert str(e.value) == message


def test_vllm_settings_that_fit_pass(tiny_llava, tiny_llava_next):
    for cfg in (_vllm_cfg(tiny_llava_next), _vllm_cfg(tiny_llava, vllm={"limit_mm_per_prompt": 1})):
        check_vllm_settings(cfg, Checkpoint.load(cfg.model))


needs_no_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")


@needs_no_vllm
def test_backend_vllm_without_vllm_names_what_to_install(tiny_llava, tmp_path):
    cfg = _vllm_cfg(tiny_llava)
    with pytest.raises(ConfigError, match=r"^backend: 'vllm' needs the vllm extra: pip install 'llava-ray\[vllm\]'$"):
        check_environment(cfg)

    f = tmp_path / "job.yaml"
    f.write_text(f"model: {{name: {tiny_llava}}}\n")
    res = cli_here("check-config", str(f), "--set", "backend=vllm")
    assert res.returncode != 0
    assert res.stderr.splitlines() == ["config error: backend: 'vllm' needs the vllm extra: pip install 'llava-ray[vllm]'"]


@pytest.mark.parametrize("settings, installed, gpu, message", [
    ({"backend": "vllm", "resources": {"num_gpus_per_actor": 1}}, {"vllm"}, False,
     "backend: 'vllm' needs a CUDA GPU and none is visible; use backend=transformers"),
    ({"model": {"attn_implementation": "flash_attention_2"}}, set(), True,
     "model.attn_implementation: flash_attention_2 needs: pip install flash-attn; or use sdpa"),
    ({"model": {"quantization": {"mode": "4bit"}}}, set(), True, "model.quantization.mode: 4bit needs: pip install 'llava-ray[quant]'"),
    ({"model": {"quantization": {"mode": "8bit"}}}, set(), True, "model.quantization.mode: 8bit needs: pip install 'llava-ray[quant]'"),
    ({"model": {"device": "cuda"}}, set(), False, "model.device: 'cuda' but no CUDA GPU is visible; use model.device=auto or cpu"),
], ids=["vllm-no-gpu", "flash-attn-missing", "4bit-no-bitsandbytes", "8bit-no-bitsandbytes", "cuda-no-gpu"])
def test_what_the_machine_lacks_is_one_line_naming_the_fix(tiny_llava, monkeypatch, settings, installed, gpu, message):
    """The machine's facts (packages found, a GPU or a cluster) set here, so each branch runs on
    any machine; the check refuses before opening the checkpoint."""
    from pipeline import checks

    monkeypatch.setattr(checks, "_has", lambda module: module in installed)
    monkeypatch.setattr(checks, "cuda_available", lambda: gpu)
    model = {"name": tiny_llava, **settings.get("model", {})}
    with pytest.raises(ConfigError) as e:
        check_environment(load_config({**settings, "model": model}))
    assert str(e.value) == message
