"""One user-error path, one typer factory, and no sub-CLI importing the root CLI."""

import ast
import tomllib
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from wardround.cli_support import cli_flags, command_group, user_errors
from wardround.common.errors import ConfigError, PrivacyBudgetExhausted

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _app(error: Exception) -> typer.Typer:
    app = command_group("demo", help="a demo group")

    @app.command("go")
    @user_errors
    def go(name: str = "x") -> None:
        raise error

    app.command("other")(lambda: None)  # a group, like the real ones
    return app


@pytest.mark.parametrize(
    ("error", "code", "title"),
    [
        (
            ConfigError("bad key [ehr.features]", hint="Fix it."),
            2,
            "configuration error",
        ),
        (PrivacyBudgetExhausted("spent"), 6, "privacy budget exhausted"),
    ],
)
def test_a_user_error_is_one_paragraph_and_its_exit_code(error, code, title):
    result = runner.invoke(_app(error), ["go", "--name", "y"])
    assert result.exit_code == code
    assert f"{title}: {error.message}" in result.output
    assert (error.hint or "") in result.output
    assert "Traceback" not in result.output


def test_debug_keeps_the_traceback_and_other_errors_propagate(monkeypatch):
    monkeypatch.setitem(cli_flags, "debug", True)
    result = runner.invoke(_app(ConfigError("bad")), ["go"])
    assert isinstance(result.exception, ConfigError)
    monkeypatch.setitem(cli_flags, "debug", False)
    result = runner.invoke(_app(ValueError("a bug")), ["go"])
    assert isinstance(result.exception, ValueError) and result.exit_code == 1


def _product_sources() -> list[Path]:
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {ROOT / folder for folder in setup["package-dir"].values()}
    return sorted(p for folder in folders for p in folder.glob("*.py"))


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_no_product_module_imports_the_root_cli():
    importers = [
        str(p.relative_to(ROOT))
        for p in _product_sources()
        if "wardround.cli" in _imports(p)
    ]
    assert importers == []


def test_every_typer_group_is_built_by_command_group():
    built = [
        str(p.relative_to(ROOT))
        for p in _product_sources()
        if "typer.Typer(" in p.read_text()
    ]
    assert built == ["wardround/cli_support.py"]
