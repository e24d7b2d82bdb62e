"""What every ``wardround`` command shares: the user-error path, option types, groups.

A command decorated with :func:`user_errors` shows a ``WardroundError`` as one
paragraph (title, message, hint) and exits with the error's code; any other
exception, and every error under ``--debug``, keeps its traceback. The root CLI
(``wardround/cli.py``) imports the command groups; a group imports only this module,
never the root CLI.
"""

from __future__ import annotations

import functools
import getpass
import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from wardround.common.errors import ConfigError, WardroundError

_P = ParamSpec("_P")
_R = TypeVar("_R")

err_console = Console(stderr=True)
# Set once per invocation by the root callback (``--debug``, ``--verbose``).
cli_flags = {"debug": False, "verbose": False}
_received: dict[str, int] = {}


def report_user_error(exc: WardroundError, *, as_json: bool = False) -> None:
    """Print a user error as one paragraph and its hint, without a traceback.

    ``as_json`` (a command run with ``--json``): the error also goes to standard
    output as one JSON object, so a script reading the output gets a document
    either way.
    """
    if as_json:
        document = {
            "error": {
                "kind": exc.title,
                "message": exc.message,
                "hint": exc.hint,
                "exit_code": exc.exit_code,
            }
        }
        typer.echo(json.dumps(document, indent=2))
    # Messages quote site.toml keys like [ehr.features]: print them as plain text.
    err_console.print(
        Text.assemble((f"{exc.title}: ", "bold red"), exc.message), soft_wrap=True
    )
    if exc.hint:
        err_console.print(Text(exc.hint), soft_wrap=True)


def user_errors(command: Callable[_P, _R]) -> Callable[_P, _R]:
    """Turn a ``WardroundError`` raised by ``command`` into its message and exit code."""

    @functools.wraps(command)
    def guarded(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return command(*args, **kwargs)
        except WardroundError as exc:
            if cli_flags["debug"]:
                raise
            report_user_error(exc, as_json=bool(kwargs.get("as_json")))
            raise typer.Exit(exc.exit_code) from None
        except PATH_ERRORS as exc:
            if cli_flags["debug"] or exc.filename is None:
                raise
            error = path_error(exc)
            report_user_error(error, as_json=bool(kwargs.get("as_json")))
            raise typer.Exit(error.exit_code) from None

    return guarded


def _file_in_the_way(path: Path) -> Path:
    """The first part of ``path`` that exists as a file (``path`` if none does)."""
    for part in (*reversed(path.parents), path):
        if part.is_file():
            return part
    return path


PATH_ERRORS = (PermissionError, NotADirectoryError, FileExistsError, IsADirectoryError)
"""A path the command was given, or derived from a setting, that it cannot use."""


def path_error(exc: OSError) -> ConfigError:
    """What to fix when a path in the way is of the wrong kind or not allowed."""
    path = exc.filename
    if isinstance(exc, PermissionError):
        user = getpass.getuser()
        return ConfigError(
            f"{path}: permission denied for the account running wardround ({user})",
            hint="Give that account access to it, or point the option or setting "
            "that names it (--out, data.cache-dir, ...) at a folder it can use.",
        )
    if isinstance(exc, IsADirectoryError):
        return ConfigError(
            f"{path} is a folder where a file is needed",
            hint="Give the path of a file (e.g. the folder's site.toml).",
        )
    return ConfigError(
        f"{_file_in_the_way(Path(path))} is a file where a folder is needed",
        hint="Point the option or setting that names it (--out, data.cache-dir, ...) "
        "at a folder, or move the file.",
    )


def interrupt_on_sigterm() -> None:
    """Make SIGTERM (systemd, a scheduler) stop this command like Ctrl-C does."""
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)


def sigterm_received() -> bool:
    """Whether the KeyboardInterrupt being handled came from SIGTERM."""
    return _received.get("signal") == signal.SIGTERM


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    _received["signal"] = signum
    raise KeyboardInterrupt


def command_group(name: str, help: str) -> typer.Typer:  # noqa: A002 - typer's name
    """A typer app for one command group, set up like every other."""
    return typer.Typer(
        name=name,
        help=help,
        no_args_is_help=True,
        add_completion=False,
        # locals could hold patient values: never print them in a traceback
        pretty_exceptions_show_locals=False,
    )


# Option types the command groups share.
SiteConfigOption = Annotated[
    Path, typer.Option("--config", help="the site's site.toml")
]
CoordinatorOption = Annotated[
    Path,
    typer.Option(
        "--coordinator",
        "--config",
        envvar="WARDROUND_COORDINATOR_CONFIG",
        help="coordinator.toml (or $WARDROUND_COORDINATOR_CONFIG)",
        dir_okay=False,
    ),
]
RunConfigOption = Annotated[
    Path | None, typer.Option(help="A run config TOML file.", dir_okay=False)
]
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON")]
ForceOption = Annotated[bool, typer.Option("--force", help="replace existing files")]
