"""The layers only look down: no module imports from a layer above its own, at top level or inside a
function (docs/architecture.md). Test modules (`*_test.py`, `conftest.py`) may use any layer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Low to high. A name is a top-level module or package of blindtune; `benchmarks` is the repository's.
LAYERS: list[tuple[str, ...]] = [
    ("encoding", "data", "models", "eval", "training"),  # ground
    ("privacy",),  # protections only: DP, SecAgg+, text privatisation, accountants
    # `config` names the engine and the strategy, and the federation reads the run's settings from it.
    ("federation", "config"),
    ("methods",),
    ("runner", "report", "audits", "export", "run_folder", "preflight", "reference_rows"),  # the run level
    ("cli",),
    ("benchmarks",),
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
# Sub-packages of `methods` that are one method each: none imports another.
METHOD_PACKAGES = ("offsite", "lleot", "fedproxy", "fedcot", "fedmkt")


def component(module: str) -> str | None:
    """The layer name of a dotted module: `blindtune.federation.apps` -> `federation`."""
    parts = module.split(".")
    if parts[0] == "benchmarks":
        return "benchmarks"
    if parts[0] == "blindtune" and len(parts) > 1:
        return parts[1]
    return None


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, module) of every import in `source`, anywhere in it (function bodies included); for
    `from blindtune import x`, the module is `blindtune.x`; relative imports are resolved."""
    found = []
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def violations(path: Path, root: Path = ROOT) -> list[str]:
    """`path:line imports module` for each import of `path` that points up a layer, or into another method."""
    module = module_name(path, root)
    own = component(module)
    if own is None:
        return []
    found = []
    for line, imported in imported_modules(path.read_text(), module, path.name == "__init__.py"):
        other = component(imported)
        if other is None:
            continue
        where = f"{path.relative_to(root)}:{line} imports {imported}"
        if other not in RANK:
            found.append(f"{where}: `{other}` has no layer (add it to LAYERS)")
        elif own in RANK and RANK[other] > RANK[own]:
            found.append(f"{where}: {own} may not import {other}, a layer above it")
        elif None not in (mine := _method_package(module), theirs := _method_package(imported)) and mine != theirs:
            found.append(f"{where}: a method imports another method")
    return found


def _method_package(module: str) -> str | None:
    parts = module.split(".")
    if parts[:2] == ["blindtune", "methods"] and len(parts) > 2 and parts[2] in METHOD_PACKAGES:
        return parts[2]
    return None


def checked_files(root: Path = ROOT) -> list[Path]:
    files = sorted((root / "blindtune").rglob("*.py")) + sorted((root / "benchmarks").glob("*.py"))
    return [p for p in files if not p.name.endswith("_test.py") and p.name != "conftest.py"]


def test_no_module_imports_from_a_layer_above_its_own():
    found = [v for path in checked_files() for v in violations(path)]
    assert not found, "\n".join(found)


def test_every_part_of_the_package_has_a_layer():
    names = {p.stem for p in (ROOT / "blindtune").glob("*.py") if not p.name.endswith("_test.py")}
    names |= {p.name for p in (ROOT / "blindtune").iterdir() if (p / "__init__.py").is_file()}
    unplaced = names - set(RANK) - {"__init__", "conftest", "layers_test"}
    assert not unplaced, f"no layer for {sorted(unplaced)}: add them to LAYERS (and docs/architecture.md)"


@pytest.mark.parametrize(
    ("path", "source", "expected"),
    [
        # inside a function, and as `from blindtune import x`
        (
            "blindtune/privacy/x.py",
            "def f():\n    from blindtune import federation\n",
            ":2 imports blindtune.federation",
        ),
        ("blindtune/federation/x.py", "import blindtune.methods.base\n", "federation may not import methods"),
        ("blindtune/methods/x.py", "from ..runner import run_experiment\n", "imports blindtune.runner.run_experiment"),
        ("blindtune/models/x.py", "from blindtune.config import RunConfig\n", "models may not import config"),
        ("blindtune/methods/lleot/x.py", "from blindtune.methods.offsite import server\n", "another method"),
        ("blindtune/runner.py", "from blindtune.telepathy import x\n", "`telepathy` has no layer"),
        ("blindtune/audits/x.py", "from blindtune.methods import get_method\nimport torch\n", None),
        ("benchmarks/x.py", "from blindtune.cli import app\n", None),
    ],
)
def test_the_check_finds_upward_imports(tmp_path, path, source, expected):
    file = tmp_path / path
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(source)
    found = violations(file, tmp_path)
    if expected is None:
        assert found == []
    else:
        assert len(found) == 1 and expected in found[0], found
