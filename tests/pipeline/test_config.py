"""Config validation, overrides, and the CLI's exit codes and one-line errors."""


import pytest
from conftest import ROOT, cli

from pipeline.config import load_config
from pipeline.errors import ConfigError


def test_shipped_configs_validate():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.model.name


def test_defaults_live_in_the_model_and_overrides_apply(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: {name: m}\n")
    cfg = load_config(f, ["generation.max_new_tokens=7", "prompt.system=Be brief.", "input.path=x.parquet"])
    assert cfg.generation.max_new_tokens == 7 and cfg.generation.greedy
    assert cfg.prompt.system == "Be brief." and cfg.input.path == "x.parquet"
    assert cfg.output is None and cfg.resources.rows_per_block == 128
    assert load_config({"model": {"name": "m"}}, {"generation.temperature": 0.7}).generation.temperature == 0.7


@pytest.mark.parametrize(
    "data, message",
    [
        ({"model": {"name": "m"}, "generaton": {}}, "generaton: unknown key (check the spelling)"),
        ({"model": {"name": "m", "dtype": "fp8"}}, "model.dtype: Input should be 'auto', 'float32', 'bfloat16' or 'float16'"),
        ({"model": {"name": "m"}, "generation": {"max_new_tokens": 0}}, "generation.max_new_tokens: Input should be greater than or equal to 1"),
        ({}, "model: Field required"),
        ({"model": {"name": "m"}, "serve": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}}, "min_replicas (3) must be <= max_replicas (2)"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(data, message):
    with pytest.raises(ConfigError) as e:
        load_config(data)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config({"model": {"name": "m"}}, ["generation.max_new_tokens"])


def test_check_config_cli_exit_codes(tmp_path, tiny_llava):
    ok = cli("check-config", "configs/demo.yaml", "--set", f"model.name={tiny_llava}")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ok: configs/demo.yaml (transformers")

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: m}\nresources: {model_actor: 2}\n")
    res = cli("check-config", str(bad))
    assert res.returncode == 2
    assert res.stderr.strip() == "config error: resources.model_actor: unknown key (check the spelling)"

    res = cli("check-config", str(tmp_path / "missing.yaml"))
    assert res.returncode == 2 and "no such config file" in res.stderr

    res = cli("check-config", "configs/demo.yaml", "--set", "model.device=cuda")
    assert res.returncode == 2
    assert res.stderr.strip() == "config error: model.device: 'cuda' but no CUDA GPU is visible; use model.device=auto or cpu"

    bad.write_text("model: [oops\n")
    res = cli("check-config", str(bad))
    assert res.returncode == 2 and "not valid YAML" in res.stderr


def test_tiny_model_cli_builds_a_loadable_checkpoint(tmp_path):
    res = cli("tiny-model", str(tmp_path / "ck"), "--family", "llava-next")
    assert res.returncode == 0, res.stderr
    import transformers as tf

    cfg = tf.AutoConfig.from_pretrained(tmp_path / "ck")
    assert cfg.model_type == "llava_next" and cfg.vision_config.image_size == 336 and cfg.vision_config.patch_size == 14
    proc = tf.AutoProcessor.from_pretrained(tmp_path / "ck")
    assert proc.patch_size == 14 and proc.vision_feature_select_strategy == "default" and proc.num_additional_image_tokens == 1
    assert proc.image_processor.image_grid_pinpoints[0] == [336, 672]
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    assert proc.apply_chat_template(msgs, add_generation_prompt=True) == "[INST] <image>\nHi [/INST]"
