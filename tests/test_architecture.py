"""The layering rules of ARCHITECTURE.md, checked on the source (ast), so they hold from now on."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "deployments")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Project modules `path` imports, at any depth (function-level imports count too)."""
    module = _module(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from .m import x`: the module m, and x in case it is a submodule (filtered below);
            # `from . import m`: the submodule m only, not the package.
            names = ([prefix] if node.module else []) + [f"{prefix}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES)
    return found


def graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module(p): p for p in files}
    return {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}


def _cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_graph_sees_real_imports():
    g = graph()
    assert "pipeline.errors" in g["pipeline.config"]
    assert "pipeline.checkpoint" in g["pipeline.preprocess"]
    assert "deployments.app" in g["pipeline.cli"]


def test_no_import_cycle():
    assert _cycle(graph()) is None, " -> ".join(_cycle(graph()))


def test_a_cycle_would_be_found():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_errors_is_a_leaf():
    assert graph()["pipeline.errors"] == set()


def test_code_points_to_nothing_outside_the_repository():
    """The pre-project design notes and the folder beside the checkout are not in a clone."""
    outside = ("DESIGN" ".md", "../" "shared/")  # split so this file does not cite them itself
    cited = [p for p in ROOT.rglob("*") if p.suffix in (".py", ".md", ".yaml", ".toml") and ".venv" not in p.parts
             and any(o in p.read_text(errors="ignore") for o in outside)]
    assert cited == []


# ARCHITECTURE.md's layer table: a pipeline module may import only modules of lower layers (and
# its own package's modules, for pipeline.engines); the endpoint (`deployments`, layer S) imports
# pipeline layers 0-5, and pipeline imports the endpoint only as `pipeline.cli` -> `deployments.app`.
LAYERS = {
    "pipeline.errors": 0,
    "pipeline.config": 1, "pipeline.families": 1, "pipeline.metrics": 1, "pipeline.layouts": 1, "pipeline.image_facts": 1,
    "pipeline.storage": 2, "pipeline.fetch": 2, "pipeline.flops": 2, "pipeline.tiny": 2, "pipeline.cluster": 2, "pipeline.pixels": 2,
    "pipeline.checkpoint": 3, "pipeline.images": 3, "pipeline.records": 3, "pipeline.lease": 3, "pipeline.progress": 3, "pipeline.manifest": 4,
    "pipeline.vllm_inputs": 4, "pipeline.engines": 4,
    "pipeline.preprocess": 5, "pipeline.checks": 5,
    "pipeline.stages": 6, "pipeline.resume": 6, "pipeline.readers": 6,
    "pipeline.job": 8, "pipeline.plan": 8, "pipeline.demo": 7, "pipeline.inputs": 7, "pipeline.outputs": 7,
    "pipeline.cli": 9, "pipeline.__main__": 10,
}
ENDPOINT_MAX_PIPELINE_LAYER = 5


def _layer(module: str) -> tuple[str, int]:
    key = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)
    return key, LAYERS[key]


def _allowed(module: str, dep: str) -> bool:
    if module.startswith("deployments"):
        if dep.startswith("deployments"):
            return dep != "deployments.app" or module == "deployments.app"  # the app wires the rest; none imports it
        return _layer(dep)[1] <= ENDPOINT_MAX_PIPELINE_LAYER
    if dep.startswith("deployments"):
        return module == "pipeline.cli" and dep == "deployments.app"
    (group, layer), (dep_group, dep_layer) = _layer(module), _layer(dep)
    return dep_layer < layer or group == dep_group == "pipeline.engines"


def test_imports_follow_the_layer_table():
    wrong = [f"{module} imports {dep}" for module, deps in graph().items() if module not in PACKAGES
             for dep in deps if not _allowed(module, dep)]
    assert wrong == []


def test_the_layer_rules_refuse_what_the_table_forbids():
    assert not _allowed("deployments.app", "pipeline.job")  # the endpoint sees pipeline layers 0-5 only
    assert not _allowed("deployments.serving", "pipeline.stages")
    assert not _allowed("pipeline.cli", "deployments.serving")  # the CLI reaches the endpoint through its app
    assert not _allowed("deployments.model", "deployments.app")
    assert not _allowed("pipeline.preprocess", "pipeline.stages")
    assert _allowed("deployments.app", "pipeline.checks") and _allowed("pipeline.cli", "deployments.app")


def _ray_importers() -> set[str]:
    """Modules that import Ray (any `ray` or `ray.*` import, at any depth)."""
    found = set()
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
                if any(n == "ray" or n.startswith("ray.") for n in names):
                    found.add(_module(path))
    return found


def test_ray_appears_only_where_architecture_says():
    """The modules ARCHITECTURE.md names in "Ray appears only in ..." are the ones importing Ray."""
    import re

    text = " ".join((ROOT / "ARCHITECTURE.md").read_text().split())
    claim = re.search(r"Ray appears only in (.*?): everything", text)
    assert claim, "ARCHITECTURE.md no longer says where Ray appears"
    named = set(re.findall(r"`([\w/]+?)(?:\.py)?/?`", claim.group(1)))
    allowed = {f"pipeline.{n}" for n in named if n != "deployments"}
    found = _ray_importers()
    assert "deployments" in named
    assert {m for m in found if not m.startswith("deployments.")} == allowed


def _attribute_users(attr: str) -> set[str]:
    """Modules that use `.attr` (a call or a reference) anywhere."""
    return {_module(path) for pkg in PACKAGES for path in (ROOT / pkg).rglob("*.py")
            if any(isinstance(n, ast.Attribute) and n.attr == attr for n in ast.walk(ast.parse(path.read_text())))}


def test_ray_data_and_serve_wiring_stay_where_architecture_says():
    """`map_batches` arguments only in stages/job/plan; `serve.deployment` and `.bind` only in the app."""
    assert _attribute_users("map_batches") == {"pipeline.stages", "pipeline.job", "pipeline.plan"}
    assert _attribute_users("deployment") | _attribute_users("bind") == {"deployments.app"}


def test_files_cited_in_the_source_exist():
    """A test or source file that a comment or document cites by path is really there."""
    import re

    cited = set()
    for path in [*ROOT.glob("*.md"), *(ROOT / "k8s").glob("*"), *[p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]]:
        if path.is_file():
            cited.update(re.findall(r"\b((?:tests|pipeline|deployments|benchmarks|configs|k8s)/[\w/.-]+\.(?:py|yaml|md))\b",
                                    path.read_text(errors="ignore")))
    assert sorted(c for c in cited if not (ROOT / c).exists()) == []
