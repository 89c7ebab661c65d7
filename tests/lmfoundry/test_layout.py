"""The house rules of the layout: imports only go down the floors, and every package is installed.

Floors, bottom to top: infra -> model -> tasks -> flows -> bench -> the CLI (lmfoundry/cli.py).
A module may import from its own floor or any floor below, never from one above.
"""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FLOORS = ["infra", "model", "tasks", "flows", "bench", "cli"]
FOLDERS = {"infra": "infra", "model": "model", "tasks": "tasks", "flows": "flows", "bench": "bench", "cli": "lmfoundry"}


def floor_of_module(name: str) -> int | None:
    """'lmfoundry.tasks.dedup.minhash' -> the floor of tasks; None for modules outside the project."""
    parts = name.split(".")
    if parts[0] != "lmfoundry" or len(parts) < 2:
        return None
    return FLOORS.index(parts[1]) if parts[1] in FLOORS else None


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports, at any depth (function-level imports count too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names if node.module == "lmfoundry"]
    return found


def project_files() -> list[tuple[str, Path]]:
    files = []
    for floor, folder in FOLDERS.items():
        files += [(floor, path) for path in sorted((ROOT / folder).rglob("*.py"))]
    return files


def test_floor_of_module():
    assert floor_of_module("lmfoundry.infra.store") == 0
    assert floor_of_module("lmfoundry.tasks.dedup.minhash") == 2
    assert floor_of_module("lmfoundry.cli") == 5
    assert floor_of_module("numpy") is None


def test_the_walker_sees_function_level_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from lmfoundry.flows.pipeline import STAGES\n    import lmfoundry.cli\n")
    assert [name for _, name in imported_modules(sample)] == ["lmfoundry.flows.pipeline", "lmfoundry.cli"]


def test_no_import_runs_up_a_floor():
    upward = []
    for floor, path in project_files():
        own = FLOORS.index(floor)
        for line, module in imported_modules(path):
            target = floor_of_module(module)
            if target is not None and target > own:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {module} ({FLOORS[target]} is above {floor})")
    assert not upward, "\n".join(upward)
    assert len(project_files()) > 50  # the walk found the project


def test_no_old_top_level_names_are_imported():
    old = []
    for _, path in project_files() + [("tests", p) for p in (ROOT / "tests").rglob("*.py")]:
        for line, module in imported_modules(path):
            if module.split(".")[0] in {"infra", "model", "tasks", "flows", "bench"}:
                old.append(f"{path.relative_to(ROOT)}:{line} imports {module}: use lmfoundry.{module}")
    assert not old, "\n".join(old)


def test_every_package_folder_is_installed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {"lmfoundry"}
    for folder in ("infra", "model", "tasks", "flows", "bench"):
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT).parts
            on_disk.add(".".join(("lmfoundry",) + relative))
    assert on_disk == listed, f"pyproject.toml [tool.setuptools] packages differs from the folders: missing {sorted(on_disk - listed)}, extra {sorted(listed - on_disk)}"
    assert all(config["package-dir"][f"lmfoundry.{name}"] == name for name in ("infra", "model", "tasks", "flows", "bench"))


def test_no_file_is_over_500_lines():
    long = [f"{path.relative_to(ROOT)}: {n} lines" for _, path in project_files() if (n := len(path.read_text().splitlines())) > 520]
    assert not long, "\n".join(long)
