"""Dependencies between the top-level packages run one way (docs/design.md, "Layout"), function-local imports
included: models <- data_prep, custom <- app <- jobs <- experiments, bench."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Each package may import the packages listed for it (and itself), nothing else of ours.
ALLOWED: dict[str, set[str]] = {
    "models": set(),
    "data_prep": {"models"},
    "custom": {"models"},
    "app": {"models", "data_prep", "custom"},
    "jobs": {"models", "data_prep", "custom", "app"},
    "experiments": {"models", "data_prep", "custom", "app", "jobs"},
    "bench": {"models", "data_prep", "custom", "app", "jobs"},
}
GENERATED = (
    "jobs/med_duallora",
    "jobs/fedit",
    "jobs/ffa_lora",
    "jobs/fedsa_lora",
    "jobs/local_only",
    "jobs/fedavg_full",
)


def imported_packages(source: str, filename: str) -> list[tuple[int, str]]:
    """(line, top-level package) of every import in the source, at any depth (function-local ones too)."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def violations(package: str, root: Path = REPO) -> list[str]:
    """`file:line imports X` for every import of one of our packages that `package` may not use."""
    ours = set(ALLOWED)
    problems = []
    for path in sorted((root / package).rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if relative.startswith(GENERATED):
            continue  # exported job folders: their launcher imports app.client, as every site script does
        for line, imported in imported_packages(path.read_text(encoding="utf-8"), relative):
            if imported in ours and imported != package and imported not in ALLOWED[package]:
                problems.append(f"{relative}:{line} imports {imported}")
    return problems


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_run_one_way(package):
    assert violations(package) == []


def test_the_packages_form_no_cycle():
    """The allowed graph itself is acyclic: a topological order exists."""
    remaining = {package: set(allowed) for package, allowed in ALLOWED.items()}
    while remaining:
        ready = [package for package, allowed in remaining.items() if not allowed & set(remaining)]
        assert ready, f"cycle among {sorted(remaining)}"
        for package in ready:
            del remaining[package]


def test_a_function_local_import_running_back_up_is_caught(tmp_path):
    """The check sees imports hidden inside functions (how app used to reach jobs)."""
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "runs.py").write_text("def f():\n    from jobs.recipe import export_job\n    return 1\n")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "x.py").write_text("import data_prep.cohort\nimport numpy\n")
    assert violations("app", tmp_path) == ["app/runs.py:2 imports jobs"]
    assert violations("models", tmp_path) == ["models/x.py:1 imports data_prep"]


def test_every_top_level_package_is_covered():
    packages = {path.parent.name for path in REPO.glob("*/__init__.py")}
    assert packages - {"tests"} == set(ALLOWED)
