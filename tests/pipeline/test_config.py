"""Config validation, overrides, and the CLI's exit codes and one-line errors."""


import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from tests.conftest import ROOT


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
        ({"model": {"name": "m"}, "serve": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}},
         "serve.autoscaling: min_replicas (3) must be <= max_replicas (2)"),
        ({"model": {"name": "m"}, "generation": {"max_new_tokens": 4, "min_new_tokens": 5}},
         "generation: min_new_tokens (5) must be <= max_new_tokens (4)"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(data, message):
    with pytest.raises(ConfigError) as e:
        load_config(data)
    assert str(e.value) == message


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config({"model": {"name": "m"}}, ["generation.max_new_tokens"])
