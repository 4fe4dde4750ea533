"""Fitness tests for the layout rules: tvr stays plain PyTorch, nothing shadows the stdlib."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_TVR = {"ray", "mlflow", "boto3", "botocore", "deepspeed", "tvr_platform", "jobs"}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_tvr_never_imports_platform_libraries():
    offenders = {str(p.relative_to(ROOT)): sorted(imported_roots(p) & FORBIDDEN_IN_TVR)
                 for p in (ROOT / "tvr").rglob("*.py") if imported_roots(p) & FORBIDDEN_IN_TVR}
    assert not offenders, f"tvr/ must stay plain PyTorch: {offenders}"


def test_importing_every_method_loads_no_platform_library():
    code = ("import sys, tvr.methods, tvr.metrics, tvr.losses; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            f"{sorted(FORBIDDEN_IN_TVR)!r}); print(bad); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_platform_is_a_source_root_not_a_package():
    assert not (ROOT / "platform" / "__init__.py").exists(), "platform/__init__.py shadows the stdlib"
    out = subprocess.run([sys.executable, "-c", "import platform; print(platform.system())"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() in {"Linux", "Darwin", "Windows"}


def test_every_method_module_is_in_the_table():
    from tvr.methods import METHODS

    modules = {p.stem for p in (ROOT / "tvr" / "methods").glob("*.py") if p.stem not in {"__init__", "base"}}
    assert modules == set(METHODS), "every tvr/methods/<name>.py exports SPEC and is listed in METHODS"
