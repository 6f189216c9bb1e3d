"""The package's floors: no module imports from a floor above its own (README's file map).

``launch/`` starts a run and may import the trainer; the trainer, the data, the model and the run-time
pieces below them run inside it and must not import ``launch/``. ``runtime/`` sits below the trainer: it
imports neither ``train/`` nor ``launch/`` nor anything that pulls them in. Imports inside functions
count as much as those at the top: a lazy import still runs upward.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "retclip_dist"


def _imports(path: Path) -> set[str]:
    """Every ``retclip_dist...`` module that ``path`` imports, anywhere in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in out if m == "retclip_dist" or m.startswith("retclip_dist.")}


def _floor(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _upward(floors: tuple[str, ...], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[1] not in floors:
            continue
        bad = sorted(m for m in _imports(path) if _floor(m) in forbidden)
        if bad:
            found[str(rel)] = bad
    return found


def test_imports_are_read_with_relative_and_lazy_imports():
    """The reader itself: it sees an import inside a function and a relative one (else the checks below
    would pass on a reader that sees nothing)."""
    found = _imports(PKG / "launch" / "submit.py")
    assert "retclip_dist.train.cli" in found  # imported inside main()
    assert "retclip_dist.runtime.stop_signals" in found
    assert _floor("retclip_dist.launch.requeue") == "launch"


def test_nothing_below_the_launcher_imports_it():
    below = ("train", "data", "model", "runtime", "shards", "eval", "export", "io")
    below += tuple(p.stem for p in PKG.glob("*.py"))  # api.py, loss.py, config.py, ...
    assert _upward(below, ("launch",)) == {}


def test_runtime_imports_nothing_above_it():
    assert _upward(("runtime",), ("train", "launch", "eval", "export", "data", "model", "api", "demo")) == {}


def test_launch_keeps_only_what_starts_a_run():
    assert sorted(p.name for p in (PKG / "launch").glob("*.py")) == ["__init__.py", "requeue.py", "submit.py"]


def test_product_code_imports_no_test_machinery():
    found = {}
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        bad = [m for m in names if m.split(".")[0] in ("unittest", "pytest", "conftest")]
        if bad:
            found[str(path.relative_to(ROOT))] = bad
    assert found == {}
