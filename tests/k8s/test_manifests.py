"""k8s/: the manifests apply to KubeRay v1.7.0 and run what exists.

- Schema: every manifest passes the CRD schemas as the API server applies them (k8s/validate.py:
  prune, default, then validate) and the operator's own rules; broken copies fail naming the field.
- Consistency: Ray version and paths match the Dockerfile, GPU capacity covers what the job and the
  Serve app ask for, readiness is left to KubeRay, credentials come from Secrets.
- What they run: the RayJob's entrypoint passes `llava-ray check-config`; the RayService's
  serveConfigV2 passes Ray Serve's schema and its import path and args build the app.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

K8S = ROOT / "k8s"
CRDS = ROOT / "k8s" / "crds"  # KubeRay v1.7.0's CRDs, unmodified (k8s/crds/SOURCE.txt)
APP_DIR = "/app/"  # WORKDIR of k8s/Dockerfile: the image's copy of the repository
GPUS_PER_MODEL_REPLICA = 1  # deployments/app.py: LlavaModel has ray_actor_options num_gpus=1


def _load_validate():
    """k8s/validate.py is a script beside the manifests, not a package: load it by path."""
    spec = importlib.util.spec_from_file_location("k8s_validate", K8S / "validate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


kv = _load_validate()
MANIFESTS = sorted([*K8S.glob("*.yaml"), *K8S.glob("*.yml")])


def load(name: str) -> dict:
    (doc,) = kv.load_yaml_docs(K8S / name)
    return doc


@pytest.fixture(scope="module")
def crds() -> str:
    assert CRDS.is_dir() and kv.DEFAULT_CRDS == CRDS, f"the CRDs ship in {CRDS}"
    return str(CRDS)


@pytest.fixture
def rayjob() -> dict:
    return load("rayjob-caption.yaml")


@pytest.fixture
def rayservice() -> dict:
    return load("rayservice-llava.yaml")


def cluster_of(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec" if doc["kind"] == "RayJob" else "rayClusterConfig"]


def groups(doc: dict) -> list[dict]:
    cluster = cluster_of(doc)
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


def ray_containers(doc: dict) -> list[tuple[dict, dict]]:
    """(pod spec, Ray container) per group: KubeRay runs Ray in the first container."""
    return [(g["template"]["spec"], g["template"]["spec"]["containers"][0]) for g in groups(doc)]


def serve_config(doc: dict) -> dict:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def local_path(image_path: str) -> Path:
    """A path inside the image, as the same file in this checkout."""
    assert image_path.startswith(APP_DIR), f"{image_path}: expected a path under {APP_DIR} (the image's WORKDIR)"
    return ROOT / image_path[len(APP_DIR):]


def entrypoint(doc: dict) -> tuple[str, dict[str, str]]:
    """(config path, {key: value} of --set) of the RayJob's `llava-ray run` entrypoint."""
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["llava-ray", "run"], argv
    sets = dict(a.split("=", 1) for flag, a in zip(argv[3::2], argv[4::2]) if flag == "--set")
    assert len(argv) == 3 + 2 * len(sets), f"only --set KEY=VALUE may follow the config: {argv}"
    return argv[2], sets


# --- schema: valid as applied, broken copies fail naming the field ---------------------------


def test_manifests_are_the_expected_kuberay_kinds():
    kinds = {p.name: [d["kind"] for d in kv.load_yaml_docs(p)] for p in MANIFESTS}
    assert kinds == {"rayjob-caption.yaml": ["RayJob"], "rayservice-llava.yaml": ["RayService"]}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_valid_for_kuberay_v1_7(path, crds):
    for doc in kv.load_yaml_docs(path):
        assert kv.validate(doc, crds) == []
        # CEL rules are not evaluated here: a manifest must not lean on one.
        _, _, cel_paths = kv.check_schema(doc, kv.load_crds(crds)[(doc["apiVersion"], doc["kind"])])
        assert cel_paths == []


def edited(name: str, old: str, new: str) -> dict:
    """The manifest with one piece of YAML text (a regex) replaced, as a user would mistype it."""
    text, count = re.subn(old, new, (K8S / name).read_text())
    assert count == 1, f"{old!r} must occur once in {name}"
    return yaml.safe_load(text)


def changed(name: str, change) -> dict:
    doc = load(name)
    change(doc)
    return doc


JOB, SVC = "rayjob-caption.yaml", "rayservice-llava.yaml"
WORKER0_JOB = "spec.rayClusterSpec.workerGroupSpecs[0]"
HEAD_SVC = "spec.rayClusterConfig.headGroupSpec"


def worker0(doc: dict) -> dict:
    return cluster_of(doc)["workerGroupSpecs"][0]


def head_ports(doc: dict) -> list:
    return cluster_of(doc)["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]


# case -> (make the broken manifest, the path the single error must name, what it must say)
BROKEN = {
    "quoted replica count": (
        lambda: edited(JOB, r"(\n +replicas: )(\d+)", r'\1"\2"'),
        f"{WORKER0_JOB}.replicas", "is not of type 'integer'",
    ),
    "unquoted rayStartParams value": (
        lambda: edited(SVC, 'num-cpus: "0"', "num-cpus: 0"),
        f"{HEAD_SVC}.rayStartParams.num-cpus", "0 is not of type 'string'",
    ),
    "misspelt top-level field": (
        lambda: edited(JOB, "shutdownAfterJobFinishes:", "shutdownAfterJobFinished:"),
        "spec.shutdownAfterJobFinished", "unknown field",
    ),
    "misspelt pod field": (
        lambda: edited(JOB, "nodeSelector:", "nodeSelecter:"),
        f"{WORKER0_JOB}.template.spec.nodeSelecter", "unknown field",
    ),
    "missing headGroupSpec (RayJob)": (
        lambda: changed(JOB, lambda d: d["spec"]["rayClusterSpec"].pop("headGroupSpec")),
        "spec.rayClusterSpec.headGroupSpec", "Required value",
    ),
    "missing headGroupSpec (RayService)": (
        lambda: changed(SVC, lambda d: d["spec"]["rayClusterConfig"].pop("headGroupSpec")),
        HEAD_SVC, "Required value",
    ),
    "quantity with a unit Kubernetes does not know": (
        lambda: edited(SVC, r"(limits: \{cpu: \S+, memory: \d+)Gi\}", r"\1GB}"),
        f"{HEAD_SVC}.template.spec.containers[0].resources.limits.memory", "GB' does not match",
    ),
    "duplicate port (listType map)": (
        lambda: changed(SVC, lambda d: head_ports(d).insert(1, {**head_ports(d)[0], "name": "again"})),
        f"{HEAD_SVC}.template.spec.containers[0].ports[1]", "Duplicate value",
    ),
    # Rules the operator enforces in code.
    "RayJob name over 47 characters": (
        lambda: changed(JOB, lambda d: d["metadata"].update(name="c" * 48)),
        "metadata.name", "RayJob name must be at most 47 characters, got 48",
    ),
    "RayService name over 47 characters": (
        lambda: changed(SVC, lambda d: d["metadata"].update(name="s" * 48)),
        "metadata.name", "RayService name must be at most 47 characters, got 48",
    ),
    "minReplicas above maxReplicas": (
        lambda: changed(SVC, lambda d: worker0(d).update(minReplicas=worker0(d)["maxReplicas"] + 1)),
        "spec.rayClusterConfig.workerGroupSpecs[0].minReplicas", "is greater than maxReplicas",
    ),
    "ttlSecondsAfterFinished without shutdownAfterJobFinishes": (
        lambda: changed(JOB, lambda d: d["spec"].update(shutdownAfterJobFinishes=False)),
        "spec.ttlSecondsAfterFinished", "only allowed with spec.shutdownAfterJobFinishes: true",
    ),
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_broken_manifest_fails_naming_the_field(case, crds):
    make, path, says = BROKEN[case]
    errors = kv.validate(make(), crds)
    assert len(errors) == 1 and errors[0].startswith(f"{path}: ") and says in errors[0], errors


@pytest.mark.parametrize("name,limit", [(JOB, 47), (SVC, 47)])
def test_name_at_the_limit_is_accepted(name, limit, crds):
    assert kv.validate(changed(name, lambda d: d["metadata"].update(name="a" * limit)), crds) == []


def test_ttl_zero_without_shutdown_is_accepted(crds):
    doc = load(JOB)
    doc["spec"]["shutdownAfterJobFinishes"] = False
    del doc["spec"]["ttlSecondsAfterFinished"]  # defaults to 0: keep the cluster, no TTL
    assert kv.validate(doc, crds) == []


def test_defaults_are_applied_before_validation(crds):
    """The CRD marks minReplicas/maxReplicas required but defaults them: the API server fills
    the defaults first, so omitting both is valid; defaults reach into list items too."""
    doc = load(JOB)
    worker = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    del worker["minReplicas"], worker["maxReplicas"]
    obj, errors, _ = kv.check_schema(doc, kv.load_crds(crds)[("ray.io/v1", "RayJob")])
    assert errors == []
    worker = obj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert (worker["minReplicas"], worker["maxReplicas"], worker["numOfHosts"]) == (0, 2**31 - 1, 1)
    assert obj["spec"]["submissionMode"] == "K8sJobMode"
    head_ports = obj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    assert {p["protocol"] for p in head_ports} == {"TCP"}


# The API server's structural-schema rules, on a schema small enough to read.
TOY = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["size"],
            "properties": {
                "size": {"type": "integer", "default": 1},
                "type": {"type": "string"},  # a property named like a keyword
                "note": {"type": "string", "nullable": True},
                "port": {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                "items": {
                    "type": "array",
                    "items": {"type": "object", "properties": {"a": {"type": "integer", "default": 5}}},
                },
            },
        }
    },
}

TOY_CASES = [
    # (object, normalized spec or None to skip, errors)
    ({"spec": {}}, {"size": 1}, []),  # default satisfies required
    ({"spec": {"size": None}}, {"size": 1}, []),  # non-nullable null takes the default
    ({"spec": {"type": None, "note": None}}, {"size": 1, "note": None}, []),  # pruned / kept (nullable)
    ({"spec": {"type": "t"}}, {"size": 1, "type": "t"}, []),
    ({"spec": {"note": 3}}, None, ["spec.note: 3 is not of type 'string', 'null'"]),
    ({"spec": {"port": 8000}}, None, []),
    ({"spec": {"port": "http"}}, None, []),
    ({"spec": {"port": 1.5}}, None, ["spec.port: 1.5 is not of type 'integer', 'string'"]),
    ({"spec": {"labels": {"a": None}}}, None, ["spec.labels.a: None is not of type 'string'"]),  # map values stay
    ({"spec": {"free": {"any": {"deep": [1]}}}}, None, []),
    ({"spec": {"items": [{}]}}, {"size": 1, "items": [{"a": 5}]}, []),
    ({"spec": {"items": [{"b": 1}]}}, None, ["spec.items[0].b: unknown field"]),
    ({"spec": {"sise": 2}}, None, ["spec.sise: unknown field"]),
    ({}, None, ["spec: Required value"]),
]


@pytest.mark.parametrize("obj,spec,errors", TOY_CASES)
def test_structural_schema_rules(obj, spec, errors):
    normalized, got, _ = kv.check_schema(copy.deepcopy(obj), TOY)
    assert got == errors
    if spec is not None:
        assert normalized["spec"] == spec


def test_cli_exit_status(tmp_path, crds):
    bad = tmp_path / "bad.yaml"
    bad.write_text((K8S / JOB).read_text().replace('num-cpus: "0"', "num-cpus: 0"))
    assert kv.main(["--crds", crds, *map(str, MANIFESTS)]) == 0
    assert kv.main(["--crds", crds, str(bad)]) == 1


# --- what the issue asks of the manifests, and consistency with the image --------------------


@pytest.mark.parametrize("name", [JOB, SVC])
def test_head_schedules_no_work(name):
    assert cluster_of(load(name))["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


@pytest.mark.parametrize("name", [JOB, SVC])
def test_gpu_worker_group(name):
    workers = cluster_of(load(name))["workerGroupSpecs"]
    assert workers
    for group in workers:
        pod = group["template"]["spec"]
        res = pod["containers"][0]["resources"]
        assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]  # Kubernetes requires it
        assert int(res["limits"]["nvidia.com/gpu"]) >= 1
        assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])
        assert pod["nodeSelector"]


@pytest.mark.parametrize("name", [JOB, SVC])
def test_shm_and_model_cache_volumes(name):
    for pod, container in ray_containers(load(name)):
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"
        hf_home = next(e["value"] for e in container["env"] if e["name"] == "HF_HOME")
        assert hf_home in mounts, f"HF_HOME={hf_home} is not a mounted volume"


SECRET_VARS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN", "LLAVA_RAY_API_KEY"}


def secret_sources(container: dict) -> tuple[set[str], set[str]]:
    """(variables taken from Secret keys, Secrets imported whole with envFrom)."""
    keyed = {e["name"] for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
    whole = {s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s}
    return keyed, whole


@pytest.mark.parametrize("name", [JOB, SVC])
def test_credentials_come_from_secrets(name):
    doc = load(name)
    for _, container in ray_containers(doc):
        literal = {e["name"] for e in container.get("env", []) if "value" in e}
        assert not literal & SECRET_VARS, f"credentials as literal values: {literal & SECRET_VARS}"
        keyed, whole = secret_sources(container)
        assert "HF_TOKEN" in keyed
        if doc["kind"] == "RayJob":  # reads and writes S3 from the driver (head) and the workers
            assert whole, "the S3 credentials Secret must reach every Ray container (envFrom secretRef)"


def test_rayjob_lifecycle_knobs(rayjob):
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0
    assert spec["submitterConfig"]["backoffLimit"] >= 0


def dockerfile() -> dict:
    """RAY_VERSION, base image, WORKDIR and COPY sources of k8s/Dockerfile."""
    text = (K8S / "Dockerfile").read_text()
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)$", text, re.M).group(1)
    base = re.search(r"^FROM (\S+)", text, re.M).group(1).replace("${RAY_VERSION}", ray_version)
    workdir = re.findall(r"^WORKDIR (\S+)$", text, re.M)[-1]
    copies = [line.split()[1:] for line in text.splitlines() if line.startswith("COPY ")]
    sources = [s for args in copies for s in args[:-1] if not s.startswith("--")]
    return {"ray_version": ray_version, "base": base, "workdir": workdir, "sources": sources, "text": text}


def test_dockerfile_builds_the_image_the_manifests_expect():
    df = dockerfile()
    assert re.fullmatch(rf"rayproject/ray:{re.escape(df['ray_version'])}-py3\d+-gpu", df["base"]), df["base"]
    assert df["workdir"].rstrip("/") + "/" == APP_DIR
    assert {"pyproject.toml", "README.md", "pipeline", "deployments", "configs"} <= set(df["sources"])
    missing = [s for s in df["sources"] if not (ROOT / s).exists()]
    assert not missing, f"k8s/Dockerfile copies what the repository lacks: {missing}"
    assert re.search(r'pip install [^\n]*"\.\[vllm\]"', df["text"])
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "vllm" in extras


def test_one_image_and_the_dockerfile_ray_version_everywhere():
    docs = [load(JOB), load(SVC)]
    assert {cluster_of(d)["rayVersion"] for d in docs} == {dockerfile()["ray_version"]}
    images = {c["image"] for d in docs for _, c in ray_containers(d)}
    assert len(images) == 1, f"one image (built from k8s/Dockerfile) for every Ray container: {images}"


def worker_total(doc: dict, replicas_field: str, resource: str) -> float:
    """Sum over worker groups of replicas x the Ray container's limit of `resource`."""
    return sum(
        g[replicas_field] * quantity(g["template"]["spec"]["containers"][0]["resources"]["limits"].get(resource, 0))
        for g in cluster_of(doc)["workerGroupSpecs"]
    )


def quantity(value) -> float:
    """A Kubernetes CPU / GPU quantity: 2, "2", "500m"."""
    value = str(value)
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def effective_config(path: Path, sets: dict):
    """The config as the CLI / build_app resolve it: file, then overrides, then defaults."""
    from pipeline.config import load_config

    return load_config(path, sets)


def test_rayjob_config_ships_in_the_image_and_fits_the_cluster(rayjob):
    config, sets = entrypoint(rayjob)
    assert local_path(config).is_file(), f"{config}: not in configs/ (the image copies configs/ to /app/configs)"
    res = effective_config(local_path(config), sets).resources
    gpus_asked = res.model_actors * res.num_gpus_per_actor
    gpus = worker_total(rayjob, "minReplicas", "nvidia.com/gpu")
    assert 0 < gpus_asked <= gpus, f"model actors ask for {gpus_asked} GPUs; the fixed-size cluster has {gpus}"
    # ARCHITECTURE.md, "Two cores": actors must leave CPU for Ray Data's read and write tasks (the head has none).
    cpus_asked = res.preprocess_actors * res.preprocess_cpus + res.model_actors * res.model_cpus
    cpus = worker_total(rayjob, "minReplicas", "cpu")
    assert cpus_asked <= cpus - 1, f"actors ask for {cpus_asked} of {cpus} worker CPUs: none left for reads/writes"


def test_rayservice_capacity_autoscaling_and_readiness(rayservice):
    spec, cluster = rayservice["spec"], rayservice["spec"]["rayClusterConfig"]
    serve = serve_config(rayservice)
    args = serve["applications"][0]["args"]
    cfg = effective_config(local_path(args["config"]), args.get("set")).serve
    lo = cfg.num_replicas or cfg.autoscaling.min_replicas  # num_replicas: a fixed count
    hi = cfg.num_replicas or cfg.autoscaling.max_replicas
    assert worker_total(rayservice, "maxReplicas", "nvidia.com/gpu") >= hi * GPUS_PER_MODEL_REPLICA
    assert worker_total(rayservice, "minReplicas", "nvidia.com/gpu") >= lo * GPUS_PER_MODEL_REPLICA
    assert cluster["enableInTreeAutoscaling"] is True  # Serve's extra replicas need GPU pods
    assert spec["upgradeStrategy"]["type"] in ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")
    # Readiness as KubeRay does it: its own probes (the worker's checks Serve's proxy on the port
    # named "serve"), so no custom probe, and that port must be the one Serve listens on.
    assert serve["http_options"]["host"] == "0.0.0.0"
    for _, container in ray_containers(rayservice):
        assert "readinessProbe" not in container and "livenessProbe" not in container
        ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
        assert ports.get("serve") == serve["http_options"]["port"], container["name"]


# --- what the manifests run ------------------------------------------------------------------


def check_config(config: Path, sets: dict[str, str]) -> subprocess.CompletedProcess:
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "check-config", str(config), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )


def test_rayjob_entrypoint_passes_check_config(rayjob, tiny_llava):
    config, sets = entrypoint(rayjob)
    # check-config opens the checkpoint; the hub is out of reach here, so a tiny one of the same
    # family stands in for the real weights (everything else is the manifest's own config).
    sets = {**sets, "model.name": tiny_llava}
    proc = check_config(local_path(config), sets)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The same call with a misspelt key fails: the check above can fail.
    bad = check_config(local_path(config), {**sets, "resources.model_actorz": "2"})
    assert bad.returncode != 0 and "model_actorz" in bad.stdout + bad.stderr


def serve_schema_fields() -> dict[str, set[str]]:
    from ray.serve.schema import (
        DeploymentSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
    )

    return {k: set(m.model_fields) for k, m in
            (("deploy", ServeDeploySchema), ("app", ServeApplicationSchema), ("deployment", DeploymentSchema))}


def test_serve_config_v2_passes_ray_serve_schema(rayservice):
    from ray.serve.schema import ServeDeploySchema

    raw = serve_config(rayservice)
    ServeDeploySchema.model_validate(raw)  # raises on a bad value
    # Serve's schema ignores unknown keys (forward compatibility): catch typos here.
    fields = serve_schema_fields()
    assert set(raw) <= fields["deploy"], set(raw) - fields["deploy"]
    for app in raw["applications"]:
        assert set(app) <= fields["app"], set(app) - fields["app"]
        for deployment in app.get("deployments", []):
            assert set(deployment) <= fields["deployment"], set(deployment) - fields["deployment"]
    (app,) = raw["applications"]
    assert app["import_path"] == "deployments.app:build_app"


def test_serve_app_builds_from_the_manifest_args(rayservice, tiny_llava_next):
    import ray
    from ray import serve

    (app,) = serve_config(rayservice)["applications"]
    module_name, func_name = app["import_path"].split(":")
    build_app = getattr(importlib.import_module(module_name), func_name)
    args = copy.deepcopy(app["args"])
    args["config"] = str(local_path(args["config"]))
    assert Path(args["config"]).is_file(), f"{app['args']['config']}: not in configs/"
    assert args["set"]["backend"] == "vllm" and "v1.6-mistral-7b" in args["set"]["model.name"]
    args["set"].update({"model.name": tiny_llava_next, "backend": "transformers"})  # CPU, tiny
    ray_was_up = ray.is_initialized()
    application = build_app(args)
    assert isinstance(application, serve.Application)
    assert ray.is_initialized() == ray_was_up, "build_app must only bind deployments, not start Ray/Serve"


def test_the_endpoints_api_key_secret_is_required(rayservice):
    """The RayService serves on 0.0.0.0: a missing key Secret must stop its pods from starting,
    never start them without authentication."""
    containers = list(ray_containers(rayservice))
    assert containers
    for _, container in containers:
        [key] = [e for e in container.get("env", []) if e["name"] == "LLAVA_RAY_API_KEY"]
        ref = key["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "llava-api-key" and ref.get("optional", False) is False
