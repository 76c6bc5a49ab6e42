"""The `llava-ray` command as a user runs it: exit codes, one-line errors, summaries, the demo."""

import os
import re
import signal
import subprocess
import sys

import httpx
import pytest
import transformers as tf
import yaml

from tests.conftest import ROOT, cli, cli_here, in_a_fresh_process, read_output, resized, write_parquet


def test_check_config_cli_exit_codes(tmp_path, tiny_llava):
    ok = cli_here("check-config", "configs/demo.yaml", "--set", f"model.name={tiny_llava}")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ok: configs/demo.yaml (transformers")

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: m}\nresources: {model_actor: 2}\n")
    res = cli("check-config", str(bad))  # a process: its exit status is the code main() returned
    assert res.returncode == 2
    assert res.stderr.strip() == "config error: resources.model_actor: unknown key (check the spelling)"

    res = cli_here("check-config", str(tmp_path / "missing.yaml"))
    assert res.returncode == 2 and "no such config file" in res.stderr

    bad.write_text("model: [oops\n")
    res = cli_here("check-config", str(bad))
    assert res.returncode == 2 and "not valid YAML" in res.stderr


def test_the_cli_process_checks_without_torch_what_it_checks_beside_it(tiny_llava, tiny_llava_next):
    """The CLI's own process runs no model (run, plan, serve and check-config load their config
    alike): it never imports torch, and prints what the same command prints where torch is
    loaded. A setting that needs a GPU keeps torch, which its check asks."""
    main = "import sys\nfrom pipeline.cli import main\nprint(main(sys.argv[1:]))"
    args = ["check-config", "configs/demo.yaml", "--set", f"model.name={tiny_llava_next}"]
    printed, loaded = in_a_fresh_process(main, *args)
    assert (printed, loaded) == ([*cli_here(*args).stdout.splitlines(), "0"], [])

    _, loaded = in_a_fresh_process(main, "check-config", "configs/demo.yaml", "--set", f"model.name={tiny_llava}",
                                   "--set", "model.device=cuda")
    assert "torch" in loaded


@pytest.mark.cpu_only
def test_cuda_device_without_a_gpu_is_a_config_error(tiny_llava):
    # a process of its own: in one with a Ray already up the checks are a cluster's, not this machine's
    res = cli("check-config", "configs/demo.yaml", "--set", f"model.name={tiny_llava}", "--set", "model.device=cuda")
    assert res.returncode == 2
    assert res.stderr.strip() == "config error: model.device: 'cuda' but no CUDA GPU is visible; use model.device=auto or cpu"


def test_tiny_model_cli_builds_a_loadable_checkpoint(tmp_path):
    res = cli_here("tiny-model", str(tmp_path / "ck"), "--layout", "llava-next")
    assert res.returncode == 0, res.stderr
    cfg = tf.AutoConfig.from_pretrained(tmp_path / "ck")
    assert cfg.model_type == "llava_next" and cfg.vision_config.image_size == 336 and cfg.vision_config.patch_size == 14
    proc = tf.AutoProcessor.from_pretrained(tmp_path / "ck")
    assert proc.patch_size == 14 and proc.vision_feature_select_strategy == "default" and proc.num_additional_image_tokens == 1
    assert proc.image_processor.image_grid_pinpoints[0] == [336, 672]
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    assert proc.apply_chat_template(msgs, add_generation_prompt=True) == "[INST] <image>\nHi [/INST]"


@pytest.mark.slow
def test_demo_runs_end_to_end_from_a_fresh_directory(tmp_path):
    """The README's first command: builds the tiny model into an empty cache, writes the photos,
    runs the job on embedded Ray, prints the table and the summary."""
    env = {**os.environ, "LLAVA_RAY_CACHE": str(tmp_path / "cache")}
    res = cli("demo", "--config", str(ROOT / "configs" / "demo.yaml"), cwd=tmp_path, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = read_output(tmp_path / "demo-data" / "output")
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["id", "text", "error"]
    table = {line.split()[0]: line for line in lines[1 : 1 + len(out)]}
    assert set(table) == set(out) == {"astronaut", "chelsea", "coffee", "rocket", "page", "hubble_deep_field", "broken"}
    assert out["broken"]["error"].startswith("image: truncated or corrupt PNG data") and table["broken"].endswith(out["broken"]["error"])
    assert all(out[k]["error"] is None and out[k]["text"] for k in out if k != "broken")
    assert lines[1 + len(out)] == "rows ok: 6  rows failed: 1  (total 7, processed this run 7)"
    assert (tmp_path / "cache" / "tiny-llava" / "tiny.json").is_file()


def _job_file(tmp_path, tiny_llava, **extra) -> str:
    rows = [{"id": i, "image": resized("coffee", 120 + i, 160), "prompt": f"Row {i}?"} for i in range(3)]
    data = {
        "model": {"name": tiny_llava}, "generation": {"max_new_tokens": 4},
        "input": {"path": write_parquet(tmp_path / "in.parquet", rows)}, "output": {"path": str(tmp_path / "out")},
        **extra,
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_run_exit_codes_and_one_line_errors(tmp_path, tiny_llava):
    job = _job_file(tmp_path, tiny_llava)
    res = cli_here("run", job, "--set", "generation.max_new_tokens=0")
    assert (res.returncode, res.stderr.strip()) == (2, "config error: generation.max_new_tokens: Input should be greater than or equal to 1")
    res = cli("run", job, "--set", f"input.path={tmp_path / 'nowhere.parquet'}")  # a process: exit status 1
    assert (res.returncode, res.stderr.strip()) == (1, f"error: input.path: {tmp_path / 'nowhere.parquet'} does not exist")
    res = cli_here("run", job, "--set", "model.name=" + str(tmp_path))  # a folder that is not a checkpoint
    assert res.returncode == 2 and res.stderr.startswith(f"config error: model.name: '{tmp_path}' is not a loadable checkpoint")
    assert len(res.stderr.strip().splitlines()) == 1
    res = cli_here("run", job, "--retry-failed", "fetch,bogus")
    assert (res.returncode, res.stderr.strip()) == (2, "config error: --retry-failed: unknown error kinds ['bogus']; use some of "
                                                       "input, fetch, decode, limits, prompt, messages, engine")
    assert not (tmp_path / "out").exists()  # nothing started


@pytest.mark.slow
def test_run_prints_the_summary_and_keep_first_keeps_the_first_in_input_order(ray_local, tmp_path, tiny_llava):
    """Six files (sorted by path) all hold id 100, and the first also repeats id 7 within itself:
    the rows kept are the first occurrences in the input's order, whatever order Ray reads in."""
    (tmp_path / "in").mkdir()
    for f in range(6):
        rows = [{"id": 100, "image": resized("rocket", 100 + 10 * f, 140), "prompt": f"File {f}?", "src": f"f{f}"},
                {"id": f, "image": resized("coffee", 90 + f, 120), "prompt": f"Own {f}?", "src": f"f{f}"}]
        if f == 0:
            rows.insert(0, {"id": 7, "image": resized("chelsea", 80, 120), "prompt": "First?", "src": "first"})
            rows.append({"id": 7, "image": resized("chelsea", 80, 130), "prompt": "Second?", "src": "second"})
        write_parquet(tmp_path / "in" / f"part-{f}.parquet", rows)
    data = {
        "model": {"name": tiny_llava}, "generation": {"max_new_tokens": 4},
        "input": {"path": str(tmp_path / "in"), "duplicate_ids": "keep_first", "passthrough": ["src"]},
        "output": {"path": str(tmp_path / "out")},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(data))
    res = cli_here("run", str(tmp_path / "job.yaml"))  # the demo's test runs `run` as a process
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert lines[0] == "rows ok: 8  rows failed: 0  (total 8, processed this run 8, dropped duplicates 6)"
    assert lines[2] == f"model: {tiny_llava}  backend: transformers/float32/sdpa"
    assert lines[3] == f"output: {tmp_path / 'out'}"
    out = read_output(tmp_path / "out")
    assert {i: r["src"] for i, r in out.items()} == {100: "f0", 7: "first", **{f: f"f{f}" for f in range(6)}}
    rate, tokens_rate, seconds = map(float, re.fullmatch(r"([\d.]+) rec/s, ([\d.]+) generated tokens/s in ([\d.]+) s", lines[1]).groups())
    tokens = sum(r["completion_tokens"] for r in out.values())  # the rates are of the output's rows and tokens
    assert rate * seconds == pytest.approx(8, rel=0.05) and tokens_rate * seconds == pytest.approx(tokens, rel=0.05)


def _as_a_background_job():
    """What a shell does to a command started with `&` (and nohup users get): SIGINT ignored,
    inherited; Python then installs no KeyboardInterrupt handler of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_serve_answers_until_interrupted(tmp_path, tiny_llava):
    """Answers, then stops on SIGINT and exits 0, even started as a background job."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "serve", "configs/serve-tiny.yaml", "--set", f"model.name={tiny_llava}",
         "--set", f"serve.port={port}", "--set", "serve.api_key_env=LLAVA_RAY_TEST_KEY"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
        env={**os.environ, "LLAVA_RAY_TEST_KEY": "from-the-env"}, preexec_fn=_as_a_background_job,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"serving at http://127.0.0.1:{port}/v1"), line
        url = f"http://127.0.0.1:{port}/v1"
        assert httpx.get(f"{url}/models", timeout=30).status_code == 401  # serve.api_key_env names the key's variable
        ok = httpx.get(f"{url}/models", headers={"Authorization": "Bearer from-the-env"}, timeout=30)
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == tiny_llava
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:  # a bound, not a timing check: Serve drains each replica and the engine is closed on the way out
            assert proc.wait(timeout=300) == 0
        finally:
            if proc.poll() is None:  # never leave a server behind
                os.killpg(proc.pid, signal.SIGKILL)


def test_serve_with_a_bad_config_exits_2(tmp_path):
    res = cli_here("serve", "configs/serve-tiny.yaml", "--set", "serve.port=0")
    assert (res.returncode, res.stderr.strip()) == (2, "config error: serve.port: Input should be greater than or equal to 1")


def test_the_demo_input_is_what_its_docstring_says(tmp_path):
    """Real photos as PNG and one truncated PNG that must fail."""
    import pyarrow.parquet as pq

    from pipeline.demo import PHOTOS, write_demo_input

    rows = {r["id"]: r["image"] for r in pq.read_table(write_demo_input(tmp_path / "in.parquet")).to_pylist()}
    assert set(rows) == {*PHOTOS, "broken"} and all(b.startswith(b"\x89PNG") for b in rows.values())
    assert len(rows["broken"]) == 200
    assert "a truncated PNG that must fail" in write_demo_input.__doc__
