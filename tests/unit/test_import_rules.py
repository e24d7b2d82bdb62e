"""The layering docs/architecture.md draws: which package may import which.

Every import counts, a lazy one inside a function too: a lazy import still ties the
importer to the imported package's code. The rules are read from the source files,
so a wrong import fails here before it ships.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("common", "sitedata", "models", "synthetic", "ops", "pki", "flower_compat", "dashboard", "client", "server", "deploy", "simulations", "wardround")  # fmt: skip
"""Top-level folders of the package (``wardround/`` holds the root: CLI, console)."""
CLI_SUPPORT = "wardround.cli_support"
"""The one error path and option types every command line shares: its own layer."""

ALLOWED: dict[str, frozenset[str]] = {
    # The pure core: math, config schema, errors, wire names.
    "common": frozenset(),
    # A site's data: site.toml, DICOM index, EHR, the study join, the datasets.
    "sitedata": frozenset({"common", "ops", "dashboard"}),
    # The model families: builders, LoRA, base folders (torch, PEFT, transformers),
    # and the demo's public base, pretrained on synthetic sites read as a site reads.
    "models": frozenset({"common", "synthetic", "sitedata", "ops"}),
    # Synthetic hospitals: a data source built on the pure core alone.
    "synthetic": frozenset({"common"}),
    # Shared by every command line (sub-CLIs import it, never the root CLI).
    "cli_support": frozenset({"common"}),
    # Operations (audit, processes, environment, secret files) and the PKI library.
    "ops": frozenset({"common", "cli_support"}),
    "pki": frozenset({"common", "ops"}),
    # The one place that knows Flower's internals.
    "flower_compat": frozenset({"common", "ops"}),
    # The web layer both dashboards share.
    "dashboard": frozenset({"common", "ops"}),
    # The two sides never import each other.
    "client": frozenset(
        {
            "common",
            "sitedata",
            "models",
            "cli_support",
            "ops",
            "pki",
            "flower_compat",
            "dashboard",
        }
    ),
    "server": frozenset(
        {
            "common",
            "models",
            "synthetic",
            "cli_support",
            "ops",
            "pki",
            "flower_compat",
            "dashboard",
        }
    ),
    # Deployment tooling drives both sides.
    "deploy": frozenset(
        {
            "common",
            "sitedata",
            "models",
            "synthetic",
            "cli_support",
            "ops",
            "pki",
            "flower_compat",
            "client",
            "server",
        }
    ),
    # The simulation command runs both sides on one machine.
    "simulations": frozenset(
        {
            "common",
            "sitedata",
            "models",
            "synthetic",
            "cli_support",
            "ops",
            "pki",
            "flower_compat",
            "dashboard",
            "client",
            "server",
        }
    ),
    # The command line wires everything together.
    "wardround": frozenset({*PRODUCT, "cli_support"}),
}

SIMULATION_IMPORTERS = {
    "wardround/cli.py": "simulate, synth, study: the simulation commands",
}
"""Outside ``simulations/``, only the simulation paths import it, each for a reason."""


def module_parts(relative: str) -> list[str]:
    """``wardround.X.Y`` of a file at ``relative`` (the package-dir mapping)."""
    parts = list(Path(relative).with_suffix("").parts)
    return parts if parts[0] == "wardround" else ["wardround", *parts]


def layer_of_file(relative: str) -> str:
    """The layer a source file belongs to: its top-level folder."""
    if relative == "wardround/cli_support.py":
        return "cli_support"
    return Path(relative).parts[0]


def imported_modules(relative: str, source: str) -> Iterator[tuple[int, str]]:
    """Every module the file imports (absolute names), with its line."""
    dotted = module_parts(relative)
    package = dotted[:-1]
    for node in ast.walk(ast.parse(source, relative)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            if module == "wardround":  # from wardround import X: X may be a package
                for alias in node.names:
                    yield node.lineno, f"wardround.{alias.name}"
            else:
                yield node.lineno, module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name


def layer_of(module: str) -> str | None:
    """The layer a module lives in; None for other projects' modules and the version."""
    parts = module.split(".")
    if parts[0] != "wardround" or parts[1:2] in ([], ["__version__"]):
        return None
    if module == CLI_SUPPORT or module.startswith(CLI_SUPPORT + "."):
        return "cli_support"
    return parts[1] if parts[1] in PRODUCT else "wardround"


def violations(sources: Iterable[tuple[str, str]]) -> list[str]:
    """Each import that breaks a rule, as ``file:line: layer -> module``."""
    found = []
    for relative, source in sources:
        layer = layer_of_file(relative)
        for line, module in imported_modules(relative, source):
            target = layer_of(module)
            if target is None or target == layer:
                continue
            if target == "simulations" and relative not in SIMULATION_IMPORTERS:
                found.append(f"{relative}:{line}: {layer} -> {module}")
            elif target != "simulations" and target not in ALLOWED[layer]:
                found.append(f"{relative}:{line}: {layer} -> {module}")
    return found


def product_sources() -> Iterator[tuple[str, str]]:
    """Every source file of the package (tests and benchmarks aside), with its text."""
    for folder in PRODUCT:
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), path.read_text()


def test_every_package_imports_only_what_its_layer_allows():
    assert violations(product_sources()) == []


@pytest.mark.parametrize(
    ("relative", "source", "expected"),
    [
        # the pure core reaching for the site, lazily
        ("common/x.py", "def f():\n    from ..client import app\n", "common -> wardround.client"),
        # the coordinator importing the site
        ("server/x.py", "import wardround.client.trainer\n", "server -> wardround.client.trainer"),
        # a product module importing the simulations
        ("server/x.py", "from ..simulations import synth\n", "server -> wardround.simulations"),
        # the model families reaching up for the simulation runner, lazily
        ("models/fusion.py", "def f():\n    from ..simulations import runner\n", "models -> wardround.simulations"),
        # a site's data reaching up into the site
        ("sitedata/x.py", "from ..client import trainer\n", "sitedata -> wardround.client"),
        # a sub-CLI importing the root CLI (a cycle)
        ("client/cli.py", "from ..cli import main\n", "client -> wardround.cli"),
    ],
)  # fmt: skip
def test_a_deliberately_wrong_import_is_caught(relative, source, expected):
    assert [v.split(": ", 1)[1] for v in violations([(relative, source)])] == [expected]


def test_allowed_imports_pass():
    sources = [
        ("client/x.py", "from ..common import wire\nfrom .. import __version__\n"),
        ("wardround/cli.py", "def f():\n    from .simulations import synth\n"),
        ("simulations/x.py", "from ..server import app\nimport numpy\n"),
    ]
    assert violations(sources) == []


IO_MODULES = frozenset(
    {"os", "shutil", "subprocess", "tempfile", "tomllib", "fcntl", "socket", "signal"}
)
"""Modules for files, processes and the machine: none of them in the pure core."""
IO_CALLS = frozenset(
    {"open", "read_text", "write_text", "read_bytes", "write_bytes", "mkdir", "unlink",
     "rename", "touch", "rmdir", "save_pretrained", "save_file"}
)  # fmt: skip
"""Calls that read or write files (builtin ``open``, ``Path`` and library savers;
not ``replace``, which strings have too)."""


def io_in(relative: str, source: str) -> list[str]:
    """``file:line: what`` for each file, process or machine access in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source, relative)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if not node.level
                else []
            )
            found += [
                f"{relative}:{node.lineno}: import {n}"
                for n in names
                if n.split(".")[0] in IO_MODULES
            ]
        elif isinstance(node, ast.Call):
            func = node.func
            name = (
                func.attr
                if isinstance(func, ast.Attribute)
                else getattr(func, "id", "")
            )
            if name in IO_CALLS:
                found.append(f"{relative}:{node.lineno}: {name}()")
    return found


def test_the_pure_core_does_no_io():
    found = [
        hit
        for relative, source in product_sources()
        if layer_of_file(relative) == "common"
        for hit in io_in(relative, source)
    ]
    assert found == [], "move these out of common/ (ops/, models/):\n" + "\n".join(
        found
    )


def test_the_io_scan_sees_files_and_processes():
    source = (
        "import os\nfrom pathlib import Path\n"
        "def f(p):\n    Path(p).write_text('x')\n    return open(p).read()\n"
    )
    assert io_in("common/x.py", source) == [
        "common/x.py:1: import os",
        "common/x.py:4: write_text()",
        "common/x.py:5: open()",
    ]
