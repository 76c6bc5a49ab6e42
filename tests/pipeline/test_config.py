"""Config validation, overrides, and the CLI's exit codes and one-line errors."""


import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from tests.conftest import ROOT


def _leaves(data: dict, path: tuple = ()):
    for key, value in data.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, (*path, key))
        else:
            yield (*path, key), value


def test_shipped_configs_validate_and_restate_no_default():
    """Each default is defined once (pipeline/config.py); a shipped config only overrides: every
    key it sets gives a value other than the config would have without it."""
    import copy

    import yaml

    for path in sorted((ROOT / "configs").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        load_config(path)
        restated = []
        for keys, value in _leaves(data):
            without = copy.deepcopy(data)
            parent = without
            for k in keys[:-1]:
                parent = parent[k]
            del parent[keys[-1]]
            try:
                dumped = load_config(without).model_dump()
            except ConfigError:  # a required key (model.name, input.path, ...)
                continue
            for k in keys:
                dumped = dumped[k]
            if dumped == value:
                restated.append(".".join(keys))
        assert restated == [], path.name


def test_the_laion_config_reads_a_laion_manifest(tmp_path):
    """configs/laion-recaption.yaml on a LAION-style manifest (key, URL, TEXT): the ids are its
    keys, the images its URLs, and each row's prompt its alt text in the template."""
    import json

    from pipeline.inputs import inspect_input
    from pipeline.readers import open_input
    from pipeline.records import Record

    rows = [{"key": "000001", "URL": "https://example.com/a.jpg", "TEXT": "a red bicycle"},
            {"key": "000002", "URL": "https://example.com/b.jpg", "TEXT": "two cats"}]
    (tmp_path / "part-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(ROOT / "configs" / "laion-recaption.yaml",
                      [f"input.path={tmp_path}/part-*.jsonl", f"output.path={tmp_path / 'out'}", "model.name=m"])
    plan = inspect_input(cfg, open_input(cfg))
    assert (plan.reader.format, plan.rows, plan.ids.to_pylist()) == ("json", 2, ["000001", "000002"])
    record = Record.from_row(rows[0], cfg.input.columns, cfg.prompt.template)
    assert (record.id, record.images) == ("000001", ["https://example.com/a.jpg"])
    assert record.prompt == "The alt text is: a red bicycle. Write a detailed caption for this image."


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


def _leaf_keys(model, prefix: str = ""):
    """Every settable key of the config, dotted (sections recursed into)."""
    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        section = next((t for t in getattr(field.annotation, "__args__", (field.annotation,))
                        if isinstance(t, type) and issubclass(t, BaseModel)), None)
        yield from _leaf_keys(section, f"{prefix}{name}.") if section else [f"{prefix}{name}"]


ODD_VALUES = ["[]", "{}", "null", "''", "-1", "0", "1e309", ".nan", "x", "[1]", "{a: 1}", "true", "99999999999999999999999",
              "'s3://'", "'/'"]


def test_every_key_takes_any_value_or_refuses_it_in_one_line_naming_it():
    """`--set KEY=VALUE` with odd values for every key: accepted, or a ConfigError naming the key."""
    from pipeline.config import Config

    base = {"model": {"name": "m"}, "input": {"path": "in.parquet"}, "output": {"path": "out"}}
    keys = list(_leaf_keys(Config))
    assert {"input.path", "output.lease_wait_s", "serve.max_batch_size", "storage.secret"} <= set(keys)
    for key in keys:
        for value in ODD_VALUES:
            try:
                load_config(base, [f"{key}={value}"])
            except ConfigError as e:
                named = str(e).split(": ", 1)[0]
                assert "\n" not in str(e) and (key.startswith(named) or named.startswith(key)), (key, value, str(e))
    assert base == {"model": {"name": "m"}, "input": {"path": "in.parquet"}, "output": {"path": "out"}}  # not changed


def test_input_and_output_values_are_refused_before_ray_in_one_line(tiny_llava, tmp_path, monkeypatch):
    """The same odd values for the input/output/storage keys, through every check a job makes
    before Ray starts (`job.preflight`): accepted, or one line (never a traceback)."""
    from pipeline import job
    from pipeline.config import Config
    from pipeline.errors import JobError
    from pipeline.job import preflight
    from tests.conftest import resized, write_parquet

    inp = write_parquet(tmp_path / "in.parquet", [{"id": 1, "image": resized("coffee", 64, 64)}])
    base = {"model": {"name": tiny_llava}, "input": {"path": inp}, "output": {"path": str(tmp_path / "out")}}
    # The model is not what varies here: its checks run once, not once per value (~240 loads).
    checkpoint = job.check_environment(load_config(base))
    monkeypatch.setattr(job, "check_environment", lambda cfg: checkpoint)
    monkeypatch.chdir(tmp_path)  # an accepted relative output (`x`, `*`) is made here, not in the repository
    for key in [k for k in _leaf_keys(Config) if k.startswith(("input.", "output.", "storage."))]:
        # '/' as an input is a folder like any other, walked whole: this machine's every file.
        odd = ["[]", "''", "'s3://'", "x", "null", "[1]", "'*'"] + (["'/'"] if not key.startswith("input.") else [])
        for value in odd:
            try:
                preflight(load_config(base, [f"{key}={value}"]))
            except (ConfigError, JobError) as e:
                assert "\n" not in str(e) and key.split(".")[0] in str(e), (key, value, str(e))
    with pytest.raises(ConfigError) as e:
        load_config(base, ["input.path=[]"])
    assert str(e.value) == "input.path: []: give an input file, folder, glob or URL, or a non-empty list of them"


@pytest.mark.parametrize("template, cause", [
    ("{}", "{} names no column"), ("{0}", "{0} names no column"), ("{a[0]}", "{a[0]} names no column"),
    ("{TEXT", "expected '}' before end of string"), ("a } b", "Single '}' encountered"),
])
def test_a_prompt_template_names_columns_or_is_refused(template, cause):
    with pytest.raises(ConfigError) as e:
        load_config({"model": {"name": "m"}, "prompt": {"template": template}})
    assert str(e.value).startswith(f"prompt.template: {template!r}: {cause}")
    cfg = load_config({"model": {"name": "m"}, "prompt": {"template": "{TEXT} {meta.title} {TEXT!r} {{x}}"}})
    assert cfg.prompt.template_columns() == ["TEXT", "meta"]


def test_the_readmes_serve_defaults_are_the_configs():
    """The README's `serve` table states defaults; pipeline/config.py defines them: they agree."""
    import itertools
    import re

    from pipeline.config import ServeConfig

    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("| setting | default | what it does |") + 2
    rows = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    stated = {}
    for row in rows:
        keys, defaults = row.split(" | ")[:2]
        for key, default in zip(re.findall(r"`(\w+)`", keys), defaults.split(" / ")):
            stated[key] = float(default)
    assert len(stated) == 5 and stated == {k: float(getattr(ServeConfig(), k)) for k in stated}
