"""Flower's private internals are reached only through wardround.flower_compat.

A Flower upgrade then touches one package: these tests name what it must still
provide, and fail when product code imports Flower's internals directly.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = (
    "client",
    "common",
    "dashboard",
    "deploy",
    "models",
    "ops",
    "pki",
    "server",
    "simulations",
    "sitedata",
    "synthetic",
    "wardround",
)
PUBLIC = {"flwr.app", "flwr.serverapp", "flwr.clientapp", "flwr.simulation"}
"""Flower's public API: ``flwr.app``, ``flwr.serverapp``, ``flwr.clientapp`` and the
simulation engine's ``run_simulation``, with their submodules."""
COMPAT_MODULES = (
    "constants",
    "flower_logging",
    "legacy",
    "pacing",
    "prompt_grid",
    "replies",
    "runtime",
    "secagg_protocol",
    "secagg_wire",
    "secagg_workflow",
    "tools",
)


def _is_public(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in PUBLIC)


def private_flower_imports(path: Path) -> list[str]:
    """``file:line module`` for each import of a private Flower module in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        else:
            continue
        for module in modules:
            if module.startswith("flwr.") and not _is_public(module):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {module}")
    return found


def test_no_product_module_imports_flowers_internals():
    found = [
        hit
        for package in PRODUCT
        for path in sorted((ROOT / package).rglob("*.py"))
        for hit in private_flower_imports(path)
    ]
    assert found == [], "route these through wardround.flower_compat:\n" + "\n".join(
        found
    )


def test_tests_and_benchmarks_reach_flowers_internals_only_through_the_package():
    """A Flower upgrade touches ``flower_compat/`` and ``tests/flower_compat/`` alone."""
    own_tests = ROOT / "tests" / "flower_compat"
    found = [
        hit
        for folder in ("tests", "bench")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if own_tests not in path.parents
        for hit in private_flower_imports(path)
    ]
    assert found == [], "route these through wardround.flower_compat:\n" + "\n".join(
        found
    )


def test_the_scan_sees_a_private_import(tmp_path):
    sample = ROOT / "server" / "_sample_for_scan.py"
    sample.write_text(
        "from flwr.app import Message\n"
        "from flwr.common.constant import ErrorCode\n"
        "def f():\n    import flwr.supercore.run\n"
    )
    try:
        found = private_flower_imports(sample)
    finally:
        sample.unlink()
    assert found == [
        "server/_sample_for_scan.py:2 flwr.common.constant",
        "server/_sample_for_scan.py:4 flwr.supercore.run",
    ]


@pytest.mark.parametrize("name", COMPAT_MODULES)
def test_every_name_the_compat_package_offers_resolves(name):
    module = importlib.import_module(f"wardround.flower_compat.{name}")
    missing = [n for n in getattr(module, "__all__", []) if not hasattr(module, n)]
    assert missing == []
