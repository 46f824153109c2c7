"""`ltserve bento models/NAME [--backend onnxruntime|torch] [--force]`: a Bento that serves one model package.

The Bento holds the package (model.json and every file it lists) under `models/<folder>/`, the serving code (the
modules `ltserve/service.py` imports, found by reading their imports, and the data files of their packages) and
nothing else, and sets `LTSERVE_MODEL` to that folder, so `bentoml serve NAME:VERSION` and the container
`bentoml containerize NAME:VERSION` builds serve that package from any working directory.

- tag: the package's name (lower case; `-torch` appended for the torch Bento) and, as version, the first 12 hex
  digits of the sha256 of its model.json (which records the sha256 of every file of the package): the same package
  always gives the same tag. A tag already in the store is left as it is (`--force` rebuilds it, e.g. after the
  serving code changed).
- dependencies: the serving requirements of ltserve (its base dependencies and the `cpu` extra: onnxruntime; the
  torch Bento adds torch) and everything they need, each pinned with `==` to the version in the repository's
  constraints.txt (the versions the test suite passed with), or the installed version for a package it does not list.
  BentoML's own locking (`lock_packages`, `uv pip compile` against PyPI at build time) is off: it would pick the
  newest bentoml 1.4.x, and `ltserve.serve` reaches into BentoML internals tested on one version only. The pins are
  resolved for this machine's platform and Python (the Bento's image uses the same Python minor version).
- the build runs in a temporary build context (a generated build configuration through `bentoml.bentos.build`), so
  the repository is not read beyond its `ltserve/` sources and nothing in it changes. The Bento goes to BentoML's
  store (`$BENTOML_HOME`, default ~/bentoml).

The torch Bento (`--backend torch`) runs the package's `model.pt2` with PyTorch (`LTSERVE_BACKEND=torch`, device and
precision auto): a package without `model.pt2` is refused here, not at the first start of the Bento.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import importlib.metadata as md
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import ltserve
from ltserve.errors import ConfigError, MissingDependency, PackageError
from ltserve.package import MODEL_JSON, ModelJson, load_package

logger = logging.getLogger(__name__)

SERVICE = "ltserve.service:Classifier"
"""The service every Bento runs (the same one `bentoml serve` runs from the repository root), through the entry
module `ENTRY` that `ltserve bento` writes beside it."""
ENTRY = "ltserve_bento"
_ENTRY_SOURCE = '''"""The entry point of this Bento, written by `ltserve bento`: ltserve's service on the model package inside it.

`bentoml serve` imports this module in its supervisor and in every worker. The service resolves a relative
LTSERVE_MODEL against the working directory, which is the Bento's folder only while BentoML imports the service (and
the variables of bento.yaml reach the container, not `bentoml serve NAME:VERSION`): so the package is named here by
its absolute path, found from this file, unless the environment names another package.
"""

import os
from pathlib import Path

PACKAGE = {folder!r}
DEFAULTS = {defaults!r}

if os.environ.get("LTSERVE_MODEL", PACKAGE) == PACKAGE:
    os.environ["LTSERVE_MODEL"] = str(Path(__file__).resolve().parent / PACKAGE)
for _name, _value in DEFAULTS.items():
    os.environ.setdefault(_name, _value)

from ltserve.service import Classifier  # noqa: E402,F401  (the settings are read when it is imported)
'''
BACKENDS = ("onnxruntime", "torch")
SERVING_EXTRAS = {"onnxruntime": ("cpu",), "torch": ("cpu",)}
"""ltserve extras whose requirements each Bento installs besides the base dependencies (the torch Bento keeps
onnxruntime: the service's start-up check of the package builds an ONNX Runtime session on CPU)."""
EXTRA_PACKAGES = {"onnxruntime": (), "torch": ("torch",)}
"""Requirements of ltserve's other extras that a Bento adds, by name (torch, from the `train` extra)."""
TORCH_ENVS = {"LTSERVE_BACKEND": "torch", "LTSERVE_TORCH_DEVICE": "auto", "LTSERVE_TORCH_PRECISION": "auto",
              "LTSERVE_TORCH_CUDA_GRAPHS": "1"}
CONSTRAINTS = Path(ltserve.__file__).resolve().parents[1] / "constraints.txt"
_NAME_OK = re.compile(r"[^a-z0-9._-]+")


@dataclass
class BentoPlan:
    """What `build_bento` puts in the Bento, decided before anything is built (`plan_bento`).

    Attributes:
        name, version: the Bento's tag.
        package: the model package folder.
        folder: where the package lies inside the Bento (`models/<package folder name>`).
        backend: "onnxruntime" or "torch".
        sources: the ltserve files to include, relative to the folder that holds `ltserve/`.
        requirements: the pinned requirements (`name==version`), sorted by name.
        envs: the variables set inside the Bento.
        labels: the Bento's labels.
    """

    name: str
    version: str
    package: Path
    folder: str
    backend: str
    sources: list[str]
    requirements: list[str]
    envs: dict[str, str]
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        return f"{self.name}:{self.version}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ltserve bento", description="Build a Bento that serves one model package: "
                                "the package, the serving code and pinned dependencies; LTSERVE_MODEL set to it.")
    p.add_argument("model", type=Path, metavar="MODEL_DIR", help="model package folder (models/NAME, from "
                   "`ltserve export`)")
    p.add_argument("--backend", choices=BACKENDS, default="onnxruntime",
                   help="onnxruntime (default; no torch in the Bento), or torch: the package's model.pt2 through "
                        "PyTorch (export with --model-format onnx,pt2)")
    p.add_argument("--name", help="Bento name (default: the package's name, '-torch' added for --backend torch)")
    p.add_argument("--force", action="store_true", help="rebuild when the tag is already in the store")
    return p


def cli(argv: list[str] | None = None) -> int:
    """Build the Bento and print its tag and how to serve and containerize it."""
    args = _parser().parse_args(list(argv or []))
    tag, built = build_bento(args.model, backend=args.backend, name=args.name, force=args.force)
    print(f"{'built' if built else 'already in the store (--force rebuilds it)'}: {tag}")
    print(f"  serve:        bentoml serve {tag} --port 3000")
    print(f"  container:    bentoml containerize {tag}   (needs a Docker-compatible engine)")
    return 0


def build_bento(model_dir: str | Path, backend: str = "onnxruntime", name: str | None = None,
                force: bool = False) -> tuple[str, bool]:
    """Build the Bento of one model package into BentoML's store.

    Args:
        model_dir: the package folder.
        backend: "onnxruntime" or "torch".
        name: the Bento's name (default: from the package's name).
        force: rebuild a tag already in the store.

    Returns:
        (tag, built): built is False when the tag was already in the store and `force` was not given.

    Raises:
        PackageError: the package is missing, invalid, or (torch) has no model.pt2.
        MissingDependency: ltserve is not installed (its requirements cannot be read).
        ConfigError: a bad backend or name.
    """
    plan = plan_bento(model_dir, backend=backend, name=name)
    import bentoml
    from ltserve.serve.bentoml_seam import bento_env
    from bentoml.exceptions import NotFound

    try:
        bentoml.bentos.get(plan.tag)
        exists = True
    except NotFound:
        exists = False
    if exists and not force:
        logger.info("%s is already in the store (same package sha256); --force rebuilds it", plan.tag)
        return plan.tag, False
    if exists:
        bentoml.bentos.delete(plan.tag)
    with tempfile.TemporaryDirectory(prefix="ltserve-bento-") as tmp:
        ctx = Path(tmp)
        if any(part.startswith(".") for part in ctx.resolve().parts):
            raise ConfigError(f"{ctx}: BentoML refuses a build context under a hidden (dot) directory; set TMPDIR "
                              "to a folder outside one (e.g. TMPDIR=/tmp)")
        _fill_context(ctx, plan)
        with _service_environment(ctx, plan.envs):
            bento = bentoml.bentos.build(
                f"{ENTRY}:Classifier", name=plan.name, version=plan.version, labels=plan.labels,
                description=_description(plan), include=[f"{ENTRY}.py", *plan.sources, f"{plan.folder}/**"],
                exclude=["**/__pycache__", "**/*.pyc"],
                envs=[bento_env(k, v) for k, v in plan.envs.items()],
                python={"packages": plan.requirements, "lock_packages": False},
                docker={"python_version": f"{sys.version_info.major}.{sys.version_info.minor}"},
                build_ctx=str(ctx))
    logger.info("built %s (%s backend, %d pinned requirements)", bento.tag, plan.backend, len(plan.requirements))
    return str(bento.tag), True


def plan_bento(model_dir: str | Path, backend: str = "onnxruntime", name: str | None = None) -> BentoPlan:
    """Everything the Bento will hold, checked: the package (schema and every sha256), its torch program when the
    backend needs it, the serving sources and the pinned requirements. Imports neither bentoml nor torch.

    Raises:
        as `build_bento`.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend!r}: use one of {', '.join(BACKENDS)}")
    package = Path(model_dir)
    meta = load_package(package)
    if backend == "torch" and "model.pt2" not in meta.files:
        raise PackageError(f"{package}: has no model.pt2, which the torch Bento runs; re-export the package with "
                           f"`ltserve export runs/NAME --head HEAD --out {package} --model-format onnx,pt2`, or build "
                           "the ONNX Runtime Bento (drop --backend torch)")
    sha = hashlib.sha256((package / MODEL_JSON).read_bytes()).hexdigest()
    bento_name = _bento_name(name or (meta.name + ("-torch" if backend == "torch" else "")))
    folder = f"models/{_bento_name(package.resolve().name)}"
    envs = {"LTSERVE_MODEL": folder, **(TORCH_ENVS if backend == "torch" else {})}
    labels = {"project": "ltserve", "model": meta.name, "backend": backend, "package_sha256": sha,
              "ltserve_version": ltserve.__version__, "head": meta.head.name, "precision": meta.graph.precision}
    return BentoPlan(name=bento_name, version=sha[:12], package=package, folder=folder, backend=backend,
                     sources=serving_sources(), requirements=pinned_requirements(backend), envs=envs, labels=labels)


def _bento_name(text: str) -> str:
    """A valid BentoML tag name: lower case letters, digits, '-', '_', '.', starting and ending alphanumeric."""
    clean = _NAME_OK.sub("-", text.lower()).strip("-._")
    if not clean:
        raise ConfigError(f"{text!r}: not usable as a Bento name; pass --name (letters, digits, '-', '_', '.')")
    return clean[:63]


# ---------------------------------------------------------------------------------------------------------------------
# The serving sources
# ---------------------------------------------------------------------------------------------------------------------


def serving_sources(root: Path | None = None) -> list[str]:
    """The files of ltserve that the service needs, relative to the folder that holds `ltserve/`.

    The modules `ltserve/service.py` imports, directly or through others (lazy imports inside functions and
    `"ltserve.x"` strings handed to importlib included), their packages' `__init__.py`, and the data files (not
    Python, not caches) in the folders of those packages.
    """
    pkg = Path(ltserve.__file__).resolve().parent if root is None else Path(root)
    todo, seen = [pkg / "service.py", pkg / "__init__.py"], set()
    while todo:
        path = todo.pop()
        if path in seen or not path.is_file():  # ltserve/serve/ is a namespace package: no __init__.py
            continue
        seen.add(path)
        for parent in path.relative_to(pkg).parents:
            todo.append(pkg / parent / "__init__.py")
        todo += [f for f in (_module_file(pkg, m) for m in _imported_modules(path, pkg)) if f is not None]
    folders = {p.parent for p in seen}
    data = {f for d in folders for f in d.iterdir()
            if f.is_file() and f.suffix not in (".py", ".pyc") and not f.name.startswith(".")}
    return sorted(str(p.relative_to(pkg.parent)).replace(os.sep, "/") for p in seen | data if p.is_file())


def _imported_modules(path: Path, pkg: Path) -> set[str]:
    """Names of the ltserve modules a file imports (absolute, relative, lazy, and importlib strings)."""
    rel = path.relative_to(pkg.parent).with_suffix("")
    parts = list(rel.parts[:-1] if rel.name == "__init__" else rel.parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                stem = parts[: len(parts) - node.level + 1]
                base = ".".join(stem + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("ltserve."):
            names.add(node.value.split(":")[0])
    return {n for n in names if n == "ltserve" or n.startswith("ltserve.")}


def _module_file(pkg: Path, name: str) -> Path | None:
    """The file of an ltserve module (or of the nearest enclosing one, for `from m import function`)."""
    parts = name.split(".")[1:]
    while parts:
        base = pkg.joinpath(*parts)
        if base.with_suffix(".py").is_file():
            return base.with_suffix(".py")
        if (base / "__init__.py").is_file():
            return base / "__init__.py"
        parts = parts[:-1]
    return pkg / "__init__.py"


# ---------------------------------------------------------------------------------------------------------------------
# Pinned requirements
# ---------------------------------------------------------------------------------------------------------------------


def read_constraints(path: Path = CONSTRAINTS) -> dict[str, str]:
    """constraints.txt as {canonical name: version} ({} when there is no such file, e.g. a wheel install)."""
    if not path.is_file():
        return {}
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[_canonical(name)] = version.strip()
    return pins


def pinned_requirements(backend: str = "onnxruntime", constraints: dict[str, str] | None = None) -> list[str]:
    """ltserve's serving requirements for `backend` and everything they need, each `name==version`.

    Versions come from constraints.txt (`read_constraints`), else from the installed distribution; a package whose
    installed version differs from constraints.txt is pinned to constraints.txt's, with a warning.

    Raises:
        MissingDependency: ltserve itself is not installed, so its requirements cannot be read.
    """
    from packaging.requirements import Requirement
    from packaging.markers import default_environment

    pins = read_constraints() if constraints is None else constraints
    env = default_environment()
    declared = declared_requirements()
    roots = [r for extra, r in declared if extra in ("", *SERVING_EXTRAS[backend])
             and (r.marker is None or r.marker.evaluate({**env, "extra": extra}))]
    roots += [r for _, r in declared if _canonical(r.name) in EXTRA_PACKAGES[backend]]
    versions: dict[str, str] = {}
    drift: list[str] = []
    done: set[tuple[str, str]] = set()  # (package, extra) whose requirements were followed
    todo: list[Requirement] = list(roots)
    while todo:
        req = todo.pop()
        key = _canonical(req.name)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            if key not in pins:
                raise MissingDependency(f"{req.name} (needed by the serving side) is not installed and not in "
                                        f"{CONSTRAINTS.name}; install it (`pip install -c constraints.txt "
                                        f"{req.name}`) and build again") from None
            versions[key] = pins[key]
            continue
        if key not in versions and key in pins and pins[key] != dist.version:
            drift.append(f"{req.name} {dist.version} (constraints.txt: {pins[key]})")
        versions[key] = pins.get(key, dist.version)
        for extra in ("", *sorted(req.extras)):
            if (key, extra) in done:
                continue
            done.add((key, extra))
            for text in dist.requires or []:
                sub = Requirement(text)
                if sub.marker is None or sub.marker.evaluate({**env, "extra": extra}):
                    todo.append(sub)
    if drift:
        logger.warning("installed versions differ from constraints.txt; the Bento pins constraints.txt's: %s",
                       ", ".join(sorted(drift)))
    return [f"{name}=={versions[name]}" for name in sorted(versions)]


def declared_requirements() -> list[tuple[str, Any]]:
    """ltserve's requirements as (extra, Requirement), "" for the base ones: from the clone's pyproject.toml when
    there is one (so that a dependency just added counts before `pip install -e .` runs again), else from the
    installed distribution's metadata.

    Raises:
        MissingDependency: neither is available.
    """
    from packaging.requirements import Requirement

    pyproject = CONSTRAINTS.parent / "pyproject.toml"
    try:
        import tomllib
    except ImportError:  # Python 3.10: the installed metadata only
        tomllib = None
    if pyproject.is_file() and tomllib is not None:
        project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
        if project.get("name") == "ltserve":
            found = [("", Requirement(r)) for r in project.get("dependencies", [])]
            for extra, reqs in project.get("optional-dependencies", {}).items():
                found += [(extra, Requirement(r)) for r in reqs]
            return found
    try:
        found = []
        for text in md.requires("ltserve") or []:
            req = Requirement(text)
            extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", str(req.marker or ""))
            found.append((extra.group(1) if extra else "", req))
        return found
    except md.PackageNotFoundError:
        raise MissingDependency("ltserve is not installed, so its serving requirements are unknown: "
                                "`pip install -e \".[cpu]\"` in the clone, then run `ltserve bento` again") from None


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ---------------------------------------------------------------------------------------------------------------------
# The build context
# ---------------------------------------------------------------------------------------------------------------------


def _fill_context(ctx: Path, plan: BentoPlan) -> None:
    """Copy the serving sources and the package (model.json and the files it lists) into the build context."""
    src_root = Path(ltserve.__file__).resolve().parents[1]
    for rel in plan.sources:
        dst = ctx / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src_root / rel, dst)
    meta = ModelJson.model_validate_json((plan.package / MODEL_JSON).read_text())
    dst_pkg = ctx / plan.folder
    dst_pkg.mkdir(parents=True)
    for name in [MODEL_JSON, *meta.files]:
        (dst_pkg / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(plan.package / name, dst_pkg / name)
    load_package(dst_pkg)  # the copy verifies (every sha256) before it goes into the Bento
    defaults = {k: v for k, v in plan.envs.items() if k != "LTSERVE_MODEL"}
    (ctx / f"{ENTRY}.py").write_text(_ENTRY_SOURCE.format(folder=plan.folder, defaults=defaults), encoding="utf-8")


@contextlib.contextmanager
def _service_environment(ctx: Path, envs: dict[str, str]) -> Iterator[None]:
    """The environment the Bento's service will see, while BentoML imports it to build: the Bento's variables, and
    none of this shell's other LTSERVE_* settings (an unrelated setting must not fail or shape the build)."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("LTSERVE_")}
    for k in saved:
        del os.environ[k]
    os.environ.update({**envs, "LTSERVE_MODEL": str(ctx / envs["LTSERVE_MODEL"])})
    try:
        yield
    finally:
        for k in [k for k in os.environ if k.startswith("LTSERVE_")]:
            del os.environ[k]
        os.environ.update(saved)


def _description(plan: BentoPlan) -> str:
    meta = load_package(plan.package, verify=False)
    top1 = (meta.metrics.get("test") or {}).get("top1")
    lines = [f"# {plan.name}", "",
             f"ltserve {ltserve.__version__} serving the model package `{meta.name}` (head {meta.head.name}, "
             f"{meta.graph.precision}, {len(meta.labels)} classes{f', test top-1 {top1:.4f}' if top1 else ''}) "
             f"with {plan.backend}.", "",
             f"Package sha256 (model.json): `{plan.labels['package_sha256']}`; the package lies at `{plan.folder}` "
             "and `LTSERVE_MODEL` names it.", "",
             "POST /classify (multipart field `image`), /classify_batch, /classify_raw; GET /model, /readyz, /livez, "
             "/metrics. Settings: LTSERVE_* environment variables."]
    return "\n".join(lines)

