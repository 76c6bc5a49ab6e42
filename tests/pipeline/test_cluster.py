"""The job on a multi-node Ray cluster (`ray.cluster_utils.Cluster`: several raylets on this
machine), as KubeRay runs it: a head with 0 CPUs, worker nodes, and the driver attached through
RAY_ADDRESS like a RayJob's entrypoint. Each pool is pinned to a node group by a custom resource
(`resources.preprocess_resources` / `model_resources`)."""

import contextlib
import os
import signal
import subprocess
import sys

import pytest
import yaml

from pipeline.config import load_config
from tests.conftest import ROOT, free_port, read_output
from tests.pipeline.test_resume import _committed_ids, _config, hold_mid_job, raylet_pid

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PREP, MODEL = {"prep_node": 4}, {"model_node": 4}


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    dashboard = free_port()
    # A lost node is declared dead after 3 missed health checks a second apart (Ray's defaults: 5, 3 s
    # apart): the job's recovery is the same, found ~10 s sooner.
    c = Cluster(initialize_head=True, connect=False,
                head_node_args={"num_cpus": 0, "include_dashboard": True, "dashboard_port": dashboard,
                               "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}})
    c.prep = c.add_node(num_cpus=2, resources=PREP)
    c.model = c.add_node(num_cpus=2, resources=MODEL)
    c.wait_for_nodes()
    yield c
    c.shutdown()


def _job(tiny_llava, tmp_path, n_rows: int):
    path, cfg = _config(tiny_llava, tmp_path, n_rows, preprocess_resources={"prep_node": 1},
                        model_resources={"model_node": 1})
    data = yaml.safe_load(path.read_text())
    data["output"] |= {"lease_wait_s": 0}  # a rerun that had to wait for the old lease would refuse
    path.write_text(yaml.safe_dump(data))
    return path, load_config(path)


def _driver(cluster, path) -> subprocess.Popen:
    """`llava-ray run` attached to the cluster, as a RayJob's entrypoint runs on the head."""
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    return subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc) -> tuple[str, str]:
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    return out, err


def _actor_nodes(cluster, since: set[str] = frozenset()) -> dict[str, dict[str, str]]:
    """{stage: {actor id: node id}} of the stage actors Ray's state API lists, alive or dead, but
    those in `since` (an earlier job's). A restarted actor keeps its id and lists its last node."""
    from ray.util.state import list_actors

    out: dict[str, dict[str, str]] = {"PreprocessStage": {}, "GenerateStage": {}}
    for actor in list_actors(address=cluster.address, limit=1000, raise_on_missing_output=False):
        for stage in out:
            if stage in actor.class_name and actor.actor_id not in since:
                out[stage][actor.actor_id] = actor.node_id
    return out


def test_driver_killed_mid_job_and_rerun_at_once_on_the_same_cluster(cluster, tiny_llava, tmp_path):
    """A RayJob retry: the driver dies (SIGKILL), its actors with it; the rerun starts at once,
    takes the dead driver's lease without waiting (lease_wait_s 0), processes only the missing
    rows, and every row is in the output once."""
    path, cfg = _job(tiny_llava, tmp_path, 40)
    proc, _ = hold_mid_job(lambda: _driver(cluster, path), lambda: len(_committed_ids(cfg)), 8, raylet_pid(cluster.model))
    os.kill(proc.pid, signal.SIGKILL)  # the driver only: the cluster lives on (and ends its actors)
    proc.wait()
    done = _committed_ids(cfg)
    assert 8 <= len(done) < 40, "the stop should land mid-job"

    out_text, err = _finish(_driver(cluster, path))
    assert "output.path: took over" in err  # the dead driver's lease, at once
    out = read_output(cfg.output.path)
    assert sorted(out) == [f"r{i:03d}" for i in range(40)] and all(r["error"] is None for r in out.values())
    assert f"processed this run {40 - len(done)}" in out_text  # only what was missing


def test_a_worker_node_lost_mid_job_and_a_fresh_one_added_every_row_once(cluster, tiny_llava, tmp_path):
    """The node of the model actors is removed mid-job (its workers die with it) and a fresh one
    with the same resources joins: Ray Data restarts the actor there and retries its blocks;
    every row is written exactly once. Each pool ran only on the nodes its resources name."""
    earlier = {a for actors in _actor_nodes(cluster).values() for a in actors}  # the module's other jobs
    path, cfg = _job(tiny_llava, tmp_path, 40)
    lost = cluster.model
    proc, paused = hold_mid_job(lambda: _driver(cluster, path), lambda: len(_committed_ids(cfg)), 8, raylet_pid(lost))
    assert len(_committed_ids(cfg)) < 40, "the node should go mid-job"
    before = _actor_nodes(cluster, earlier)
    assert set(before["GenerateStage"].values()) == {lost.node_id}  # where the model actors run until the loss
    cluster.remove_node(lost, allow_graceful=False)
    with contextlib.suppress(ProcessLookupError):  # if it outlived its raylet, it sees the raylet gone and exits
        os.kill(paused, signal.SIGCONT)
    cluster.model = cluster.add_node(num_cpus=2, resources=MODEL)
    _finish(proc)
    out = read_output(cfg.output.path)
    assert sorted(out) == [f"r{i:03d}" for i in range(40)] and all(r["error"] is None for r in out.values())

    after = _actor_nodes(cluster, earlier)
    assert set(before["PreprocessStage"].values()) == set(after["PreprocessStage"].values()) == {cluster.prep.node_id}
    # Restarted (same id) or replaced, the model actors that finished the job ran on the fresh node.
    assert cluster.model.node_id in set(after["GenerateStage"].values()) <= {lost.node_id, cluster.model.node_id}
