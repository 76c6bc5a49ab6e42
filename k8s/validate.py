#!/usr/bin/env python
"""Offline check of KubeRay manifests: what `kubectl apply` and the operator would reject.

The API server checks a custom resource against its CRD's structural schema only after it has
pruned and defaulted the object, and the KubeRay operator then rejects more in Go code. jsonschema
alone does neither, so this module does it in three steps:

1. `normalize`: walk the object beside the schema the way the apiextensions apiserver does:
   unknown fields are errors where the schema does not preserve them (kubectl's default strict
   field validation), nulls of non-nullable fields are replaced by their default or dropped, and
   missing fields with a default are filled in.
2. `schema_errors`: jsonschema on the normalized object, with the CRD's OpenAPI v3 dialect spelt
   as JSON Schema (`nullable` -> "null" allowed, `x-kubernetes-int-or-string` -> int or string).
3. `operator_errors`: the rules KubeRay v1.7.0 enforces in code
   (ray-operator/controllers/ray/utils/validation.go), which no schema can express.

CEL rules (`x-kubernetes-validations`) are not evaluated; `normalize` reports the paths a manifest
sets that carry one, so a caller can insist there are none.

Usage: python k8s/validate.py [--crds DIR] MANIFEST.yaml ...
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from functools import lru_cache
from pathlib import Path

import jsonschema
import yaml

# Unmodified copies of KubeRay v1.7.0's CRDs live beside this file (k8s/crds/SOURCE.txt).
DEFAULT_CRDS = Path(__file__).resolve().parent / "crds"
CRD_SOURCE = (
    "https://github.com/ray-project/kuberay, folder ray-operator/config/crd/bases at tag v1.7.0 "
    "(ray.io_rayjobs.yaml, ray.io_rayservices.yaml, ray.io_rayclusters.yaml)"
)

# KubeRay appends a 6-character suffix to RayJob / RayService names for the RayCluster, whose
# name is capped at 53 so that "<name>-serve-svc" fits a 63-character Service name.
MAX_NAME_LENGTH = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_RESOURCE_PARAMS = ("num-cpus", "num-gpus", "memory", "resources")
_UPGRADE_TYPES = ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1 MB+ of YAML each


def load_yaml_docs(path: str | Path) -> list[dict]:
    """Every non-empty document of a (multi-document) YAML file."""
    return [d for d in yaml.load_all(Path(path).read_text(), Loader=_LOADER) if d is not None]


@lru_cache(maxsize=None)
def load_crds(crd_dir: str | Path) -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> openAPIV3Schema for every served version of the CRDs in crd_dir."""
    schemas = {}
    for path in sorted(Path(crd_dir).glob("*.yaml")):
        for crd in load_yaml_docs(path):
            if crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served"):
                    schemas[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    if not schemas:
        raise FileNotFoundError(f"no CustomResourceDefinitions in {crd_dir}; get them from {CRD_SOURCE}")
    return schemas


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def normalize(obj: dict, schema: dict) -> tuple[dict, list[str], list[str]]:
    """Prune and default `obj` as the API server does before validating it.

    Returns (normalized copy, unknown-field and duplicate-key errors, paths set in `obj` that
    carry a CEL rule). Order follows apiextensions-apiserver: a null of a non-nullable field
    takes the field's default, else it is dropped (only object fields; null list items and map
    values stay and fail validation); absent fields with a default are filled; defaults are
    walked too, so nested defaults apply.
    """
    errors: list[str] = []
    cel_paths: list[str] = []

    def walk(value, s: dict, path: str):
        if s.get("x-kubernetes-validations"):
            cel_paths.append(path)
        if isinstance(value, dict) and s.get("type") == "object":
            return walk_object(value, s, path)
        if isinstance(value, list) and s.get("type") == "array" and isinstance(s.get("items"), dict):
            items = [walk(null_default(v, s["items"]), s["items"], f"{path}[{i}]") for i, v in enumerate(value)]
            check_list_keys(items, s, path)
            return items
        return value

    def walk_object(value: dict, s: dict, path: str) -> dict:
        props = s.get("properties", {})
        extra = s.get("additionalProperties")
        out = {}
        for key, v in value.items():
            if not path and key == "metadata":  # ObjectMeta: the API server validates it itself
                out[key] = v
                continue
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is None:
                if s.get("x-kubernetes-preserve-unknown-fields"):
                    out[key] = v
                else:
                    errors.append(f"{_join(path, key)}: unknown field")
                continue
            v = null_default(v, sub)
            if v is None and key in props and not sub.get("nullable"):
                continue  # pruned, as the API server does
            out[key] = walk(v, sub, _join(path, key))
        for key, sub in props.items():
            if key not in out and "default" in sub:
                out[key] = walk(copy.deepcopy(sub["default"]), sub, _join(path, key))
        return out

    def null_default(v, s: dict):
        if v is None and not s.get("nullable") and "default" in s:
            return copy.deepcopy(s["default"])
        return v

    def check_list_keys(items: list, s: dict, path: str) -> None:
        """listType map / set: the API server rejects duplicate keys / items."""
        list_type = s.get("x-kubernetes-list-type")
        if list_type not in ("map", "set"):
            return
        keys = s.get("x-kubernetes-list-map-keys", [])
        seen = set()
        for i, item in enumerate(items):
            ident = {k: item.get(k) for k in keys} if list_type == "map" and isinstance(item, dict) else item
            fingerprint = json.dumps(ident, sort_keys=True, default=str)
            if fingerprint in seen:
                errors.append(f"{path}[{i}]: Duplicate value: {fingerprint}")
            seen.add(fingerprint)

    return walk(obj, schema, ""), errors, cel_paths


def _as_json_schema(s: dict) -> dict:
    """A CRD's OpenAPI v3 schema as JSON Schema draft 4 (recursing on schema keywords only,
    so that a property named "type" or "nullable" is never mistaken for a keyword)."""
    out = dict(s)
    if "properties" in s:
        out["properties"] = {k: _as_json_schema(v) for k, v in s["properties"].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(s.get(key), dict):
            out[key] = _as_json_schema(s[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in s:
            out[key] = [_as_json_schema(x) for x in s[key]]
    if s.get("x-kubernetes-int-or-string"):
        out.pop("anyOf", None)
        out["type"] = ["integer", "string"]
    if s.get("nullable") and "type" in out:
        types = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = [*types, "null"]
    return out


_validators: dict[int, tuple[dict, jsonschema.Draft4Validator]] = {}


def _validator(schema: dict) -> jsonschema.Draft4Validator:
    """One translated validator per schema object (a CRD schema is megabytes); the cache holds
    the schema too, so its id cannot be reused by another object."""
    hit = _validators.get(id(schema))
    if hit is None:
        hit = _validators[id(schema)] = (schema, jsonschema.Draft4Validator(_as_json_schema(schema)))
    return hit[1]


def _path(parts) -> str:
    out = ""
    for p in parts:
        out = f"{out}[{p}]" if isinstance(p, int) else _join(out, p)
    return out


def schema_errors(obj: dict, schema: dict) -> list[str]:
    """jsonschema errors of a normalized object, each as 'json.path: message'."""
    errors = []
    for err in _validator(schema).iter_errors(obj):
        path = _path(err.absolute_path)
        if err.validator == "required":  # name the missing field, as the API server does
            missing = [f for f in err.validator_value if f not in err.instance]
            errors += [f"{_join(path, f)}: Required value" for f in missing]
        else:
            errors.append(f"{path or '<root>'}: {err.message}")
    return sorted(set(errors))


def check_schema(doc: dict, schema: dict) -> tuple[dict, list[str], list[str]]:
    """What the API server does with `doc` for one openAPIV3Schema:
    (normalized object, errors, paths set in doc that carry an unevaluated CEL rule)."""
    obj, errors, cel_paths = normalize(doc, schema)
    return obj, errors + schema_errors(obj, schema), cel_paths


def operator_errors(obj: dict) -> list[str]:
    """Rules KubeRay v1.7.0 enforces in code (validation.go), for a normalized RayJob,
    RayService or RayCluster: the operator refuses such an object and records an event."""
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    name = (obj.get("metadata") or {}).get("name", "")
    errors = []
    limit = MAX_NAME_LENGTH.get(kind)
    if limit and len(name) > limit:
        errors.append(f"metadata.name: {kind} name must be at most {limit} characters, got {len(name)}")
    if not _DNS1035_LABEL.match(name):
        errors.append(f"metadata.name: {name!r} is not a DNS-1035 label (lowercase letters, digits, '-')")
    cluster_field = {"RayJob": "spec.rayClusterSpec", "RayService": "spec.rayClusterConfig", "RayCluster": "spec"}
    if kind in cluster_field:
        path = cluster_field[kind]
        cluster = spec if kind == "RayCluster" else spec.get(path.split(".")[1])
        if cluster:
            errors += _cluster_errors(cluster, path)
    if kind == "RayJob":
        errors += _rayjob_errors(spec)
    if kind == "RayService":
        upgrade = (spec.get("upgradeStrategy") or {}).get("type")
        if upgrade is not None and upgrade not in _UPGRADE_TYPES:
            errors.append(f"spec.upgradeStrategy.type: {upgrade!r} is not one of {', '.join(_UPGRADE_TYPES)}")
    return errors


def _cluster_errors(cluster: dict, path: str) -> list[str]:
    errors = []
    workers = cluster.get("workerGroupSpecs") or []
    groups = [("headGroupSpec", cluster.get("headGroupSpec") or {})]
    groups += [(f"workerGroupSpecs[{i}]", g) for i, g in enumerate(workers)]
    for where, group in groups:
        gpath = f"{path}.{where}"
        if not ((group.get("template") or {}).get("spec") or {}).get("containers"):
            errors.append(f"{gpath}.template.spec.containers: at least one container is required")
        params = group.get("rayStartParams") or {}
        if group.get("resources") and any(params.get(k) for k in _RESOURCE_PARAMS):
            errors.append(f"{gpath}.resources: set Ray resources in rayStartParams or in resources, not both")
        if "labels" in params:
            errors.append(f"{gpath}.rayStartParams.labels: not supported; use {gpath}.labels")
    for i, group in enumerate(workers):
        low, high = group.get("minReplicas"), group.get("maxReplicas")
        gpath = f"{path}.workerGroupSpecs[{i}]"
        for field, value in (("minReplicas", low), ("maxReplicas", high)):
            if value is not None and value < 0:
                errors.append(f"{gpath}.{field}: must be non-negative, got {value}")
        if low is not None and high is not None and low > high:
            errors.append(f"{gpath}.minReplicas: {low} is greater than maxReplicas {high}")
    return errors


def _rayjob_errors(spec: dict) -> list[str]:
    errors = []
    shutdown = spec.get("shutdownAfterJobFinishes", False)
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    if ttl < 0:
        errors.append(f"spec.ttlSecondsAfterFinished: must be non-negative, got {ttl}")
    elif ttl > 0 and not shutdown:
        errors.append("spec.ttlSecondsAfterFinished: only allowed with spec.shutdownAfterJobFinishes: true")
    if spec.get("suspend") and not shutdown:
        errors.append("spec.suspend: only allowed with spec.shutdownAfterJobFinishes: true")
    deadline = spec.get("activeDeadlineSeconds")
    if deadline is not None and deadline <= 0:
        errors.append(f"spec.activeDeadlineSeconds: must be positive, got {deadline}")
    if spec.get("backoffLimit", 0) < 0:
        errors.append(f"spec.backoffLimit: must be non-negative, got {spec['backoffLimit']}")
    if spec.get("submissionMode") == "InteractiveMode" and spec.get("backoffLimit", 0) > 0:
        errors.append("spec.backoffLimit: retries are not supported in InteractiveMode")
    if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
        errors.append("spec.rayClusterSpec: one of rayClusterSpec or clusterSelector must be set")
    try:
        yaml.safe_load(spec.get("runtimeEnvYAML") or "")
    except yaml.YAMLError as exc:
        errors.append(f"spec.runtimeEnvYAML: not valid YAML: {exc}")
    return errors


def validate(doc: dict, crd_dir: str | Path = DEFAULT_CRDS) -> list[str]:
    """Everything the API server, then the operator, would reject in `doc` ('path: message').

    Operator rules run only on an object the API server would have accepted, as in a cluster.
    """
    key = (doc.get("apiVersion"), doc.get("kind"))
    schemas = load_crds(str(crd_dir))
    if key not in schemas:
        known = ", ".join(sorted(f"{v} {k}" for v, k in schemas))
        return [f"apiVersion/kind: no CRD for {key[0]} {key[1]} (known: {known})"]
    obj, errors, _ = check_schema(doc, schemas[key])
    return errors or operator_errors(obj)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check KubeRay manifests offline against the CRDs.")
    parser.add_argument("manifests", nargs="+", type=Path)
    parser.add_argument("--crds", type=Path, default=DEFAULT_CRDS, help=f"CRD folder (default {DEFAULT_CRDS})")
    args = parser.parse_args(argv)
    if not args.crds.is_dir():
        print(f"no CRDs at {args.crds}; get them from {CRD_SOURCE}", file=sys.stderr)
        return 2
    failed = False
    for path in args.manifests:
        for doc in load_yaml_docs(path):
            errors = validate(doc, args.crds)
            label = f"{path}: {doc.get('kind')} {(doc.get('metadata') or {}).get('name')}"
            print(f"{label}: {'INVALID' if errors else 'ok'}")
            for error in errors:
                print(f"  {error}")
            failed = failed or bool(errors)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
