"""The import rules and size limits of docs/architecture.md, checked on the source."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "scaling_study"
MODULES = sorted(PACKAGE.rglob("*.py"))
STAGES = {"corpus", "pretrain", "finetune", "orchestration", "workers", "records", "studystate", "raycluster"}


def _imports(path: Path) -> set[str]:
    """Every scaling_study module a file imports, anywhere in it (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("scaling_study"):
            found.add(node.module.removeprefix("scaling_study").lstrip("."))
            if node.module == "scaling_study":
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("scaling_study.") for a in node.names if a.name.startswith("scaling_study"))
    return found


def _name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def test_only_the_cli_and_submit_import_the_study_driver():
    importers = {_name(p) for p in MODULES if "orchestration" in _imports(p)} - {"orchestration"}
    assert importers <= {"cli", "submit"}, importers


@pytest.mark.parametrize("module", ["storage", "artifacts"])
def test_the_storage_layers_import_no_stage(module):
    imported = _imports(PACKAGE / f"{module}.py")
    assert not imported & STAGES, imported & STAGES


def test_results_and_report_import_neither_ray_nor_torch():
    code = ("import sys\n"
            "for name in ('ray', 'torch'):\n"
            "    sys.modules[name] = None  # any import of them now raises ImportError\n"
            "import scaling_study.results, scaling_study.report, scaling_study.analysis, scaling_study.artifacts\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{_name(path)}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, long


def test_the_study_driver_stays_small():
    assert len((PACKAGE / "orchestration.py").read_text().splitlines()) < 450
