"""The package layout: imports go only toward the foundations, along the data flow, and never in a circle.

The graph is read from the source (every `import`, `from ... import`, every string constant naming an `ltserve.`
module, which is how an `importlib` call would hide an edge, and every `"module:attr"` string naming one, which is
how a server or a worker process is pointed at code), so a lazy import inside a function counts as much as one at
the top of a file.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ltserve"

FOUNDATIONS = ["errors", "fileio", "progress", "preprocess", "metrics", "open_set", "samplers", "heads", "config",
               "rundir", "package"]
"""Importable by everything; each may import only the ones before it (and the package root, for its version)."""

STAGES: dict[str, set[str]] = {
    "data": set(),
    "features": {"data"},
    "train": {"data", "features"},
    "rebalance": {"data", "features"},
    "runtime": set(),
    "evaluate": {"data", "features", "runtime"},
    "export": {"data", "features", "evaluate"},
    "serve": {"runtime"},
    "batch": {"data", "runtime"},
}
"""Stage package -> the stages it may import (besides the foundations)."""

TOP = {"service", "cli", "demo"}
"""On top: may import anything, and nothing imports them (but `TOP_EDGES`)."""
TOP_EDGES = {("cli", "demo")}
"""The one edge between programs on top: `ltserve demo` runs the demo program (ltserve/demo.py)."""

LAUNCHES = {
    ("ltserve.serve.process", "ltserve.service"):
        "ServerProcess runs `bentoml serve ltserve.service:Classifier` in a child process: that process imports the "
        "service, this one never does, so serve/ stays importable without BentoML's service module or torch",
    ("ltserve.cli.bento", "ltserve.service"):
        "`ltserve bento` writes the service target into bentofile.yaml; BentoML imports it where the bento is served",
}
"""Edges against the layering that are allowed because the string names a child process's target, not an import
of this process: (module, target) -> why. Each must still be in the graph (a stale allowance fails)."""

TARGET = re.compile(r"^([a-z_][\w.]*):[A-Za-z_]\w*$")
"""A `"module:attr"` string (`bentoml serve ltserve.service:Classifier`, an entry point, a worker target)."""


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["ltserve", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _targets(module: str, path: Path) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                stem = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(stem + ([node.module] if node.module else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            target = TARGET.match(node.value)
            if target:  # "ltserve.service:Classifier": the module before the colon
                names = [target.group(1)]
            elif node.value.startswith("ltserve."):  # importlib.import_module("ltserve.x")
                names = [node.value]
        for name in names:
            target = _resolve(name) if name.startswith("ltserve") else None
            # a module's own parent packages are not edges (importing a sibling runs the shared __init__)
            if target and target != module and not module.startswith(target + "."):
                found.add(target)
    return found


EDGES = {m: _targets(m, p) for m, p in MODULES.items()}


def _unit(module: str) -> str:
    """The layer unit of a module: "ltserve.heads.crt" -> "heads", "ltserve" -> "" (the package root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _allowed(src: str, dst: str) -> bool:
    if dst == "":  # the package root holds the version only
        return True
    if src in TOP:
        return dst not in TOP or dst == src or (src, dst) in TOP_EDGES
    if dst in TOP:
        return False
    if src in FOUNDATIONS:
        return dst in FOUNDATIONS and FOUNDATIONS.index(dst) < FOUNDATIONS.index(src)
    if src in STAGES:
        return dst in FOUNDATIONS or dst in STAGES[src]
    return False


def test_every_module_belongs_to_a_layer():
    units = {_unit(m) for m in MODULES} - {""}
    assert units <= set(FOUNDATIONS) | set(STAGES) | TOP, sorted(units - set(FOUNDATIONS) - set(STAGES) - TOP)


def test_imports_only_toward_the_foundations_and_along_the_data_flow():
    wrong = sorted(f"{src} imports {dst}" for src, dsts in EDGES.items() for dst in dsts
                   if _unit(src) != _unit(dst) and not _allowed(_unit(src), _unit(dst)) and (src, dst) not in LAUNCHES)
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_every_allowed_launch_is_still_in_the_graph():
    stale = [f"{src} -> {dst}" for src, dst in LAUNCHES if dst not in EDGES.get(src, set())]
    assert not stale, f"LAUNCHES lists edges the code no longer has; remove them: {stale}"


def test_no_import_cycle():
    """Tarjan's strongly connected components over modules: every component is a single module. A launch (a child
    process's target, `LAUNCHES`) imports nothing here, so it cannot close a cycle and is left out."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in EDGES[v]:
            if (v, w) in LAUNCHES:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(EDGES):
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("src, dst, allowed", [
    ("evaluate", "rebalance", False),   # reporting reads files and the registry, never stage 2
    ("train", "rebalance", False),
    ("heads", "config", False),         # config reads the registry, not the other way round
    ("config", "heads", True),
    ("runtime", "features", False),     # the serving path has no torch
    ("export", "evaluate", True),
    ("cli", "rebalance", True),
    ("cli", "demo", True),              # `ltserve demo` runs the demo program
    ("demo", "cli", False),
    ("service", "cli", False),
])
def test_the_rules_themselves(src, dst, allowed):
    """The checker is not vacuous: it tells allowed edges from forbidden ones."""
    assert _allowed(src, dst) is allowed


def test_the_graph_sees_a_lazy_import_an_importlib_string_and_a_process_target(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text("def f():\n    from ltserve.rebalance import rebalance\n"
                    "import importlib\nimportlib.import_module('ltserve.train.loop')\n"
                    "TARGET = 'ltserve.service:Classifier'\nKEY = 'ltserve.open_set_stats'\nURL = 'http://a:80'\n")
    assert _targets("ltserve.evaluate.probe", path) == {"ltserve.rebalance", "ltserve.train.loop", "ltserve.service"}
    assert not _allowed("serve", "service")  # so serve/process.py's target is an edge against the layering,
    assert ("ltserve.serve.process", "ltserve.service") in LAUNCHES  # allowed only as a launch, with its reason


ENTRY_POINT_BODIES = {"ltserve.cli": "the `ltserve` console script's dispatcher (`main`) and its command table"}
"""Packages whose `__init__.py` may hold code, and why; every other one only names its public interface."""


def test_package_init_files_only_name_the_public_interface():
    """A package's `__init__.py` holds its docstring, imports, constants and `__all__` (and a PEP 562 `__getattr__`
    for names imported on first use); its code lives in named modules."""
    bodies = []
    for module, path in MODULES.items():
        if path.name != "__init__.py" or module in ENTRY_POINT_BODIES:
            continue
        for node in ast.parse(path.read_text(), str(path)).body:
            thin = isinstance(node, (ast.Import, ast.ImportFrom, ast.Assign, ast.AnnAssign, ast.If, ast.Expr)) or (
                isinstance(node, ast.FunctionDef) and node.name in ("__getattr__", "__dir__"))
            if not thin:
                bodies.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {type(node).__name__} "
                              f"{getattr(node, 'name', '')}")
    assert not bodies, "move these into a named module and re-export them:\n" + "\n".join(bodies)


def test_serve_names_its_interface_and_imports_nothing_heavy_until_used():
    import subprocess
    import sys

    code = ("import sys, ltserve.serve as s\n"
            "heavy = ('bentoml', 'torch', 'uvicorn', 'onnxruntime')\n"
            "print(sorted(m for m in heavy if m in sys.modules))\n"
            "print(all(getattr(s, n) is not None for n in s.__all__), s.ServerProcess.__module__)\n"
            "print(sorted(m for m in ('bentoml', 'torch') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split("\n")[:3] == ["[]", "True ltserve.serve.process", "[]"], out.stdout + out.stderr
