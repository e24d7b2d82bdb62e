"""The ``wardround audit`` command: show, filter, merge and verify audit logs.

Registered by ``wardround/cli.py`` as ``app.command("audit")(audit_command)``.
Giving the coordinator's log and a site's log together interleaves them by time.
rich is imported inside the command, so ``--help`` stays fast.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from wardround.cli_support import user_errors

if TYPE_CHECKING:
    from rich.text import Text

# Shown in their own columns (or not at all); every other field goes to "details".
_COLUMN_KEYS = frozenset(
    {"seq", "time", "actor", "event", "run_id", "prev", "sha256", "hmac"}
)

_MOMENT_HELP = "ISO date or time, inclusive (UTC if no zone)"


@user_errors
def audit_command(
    logs: Annotated[
        list[Path],
        typer.Argument(
            metavar="LOG",
            help="audit.jsonl files, or folders holding one",
            show_default=False,
        ),
    ],
    run: Annotated[
        str | None,
        typer.Option(
            "--run",
            help="only events of this run, in the coordinator's and the sites' logs "
            "alike; give its run name (20261207-040131-4f37e74c), a Flower run id, "
            "its app hash (8+ hex digits) or a site's ledger key (wardround site "
            "privacy). Give the coordinator's log too: it ties the run name to "
            "the Flower run ids; without it, the app hash ties them, taking in "
            "other runs of the same app.",
        ),
    ] = None,
    site: Annotated[
        str | None, typer.Option("--site", help="only events naming this site")
    ] = None,
    event: Annotated[
        list[str] | None,
        typer.Option("--event", help="only these events (repeat or comma-separate)"),
    ] = None,
    since: Annotated[str | None, typer.Option("--since", help=_MOMENT_HELP)] = None,
    until: Annotated[str | None, typer.Option("--until", help=_MOMENT_HELP)] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="print JSON lines instead of a table")
    ] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify", help="check each log's keyed chain; exit 3 if broken or unkeyed"
        ),
    ] = False,
    key: Annotated[
        Path | None,
        typer.Option(
            "--key",
            help="the logs' key file, when it is not beside the log (audit.key)",
            dir_okay=False,
        ),
    ] = None,
) -> None:
    """Show audit logs merged by time, filtered; or verify their keyed chains."""
    from wardround.ops.audit import (
        filter_events,
        merge_by_time,
        read_audit,
        verify_audit,
    )

    paths = [_log_file(path) for path in logs]
    if verify:
        _report_checks([(path, verify_audit(path, key)) for path in paths], as_json)
        return
    wanted = _event_filter(event)
    lower = _moment(since, "--since")
    upper = _moment(until, "--until")
    merged = merge_by_time(entry for path in paths for entry in read_audit(path))
    shown = filter_events(
        merged, run=run, site=site, event=wanted, since=lower, until=upper
    )
    if run is not None:
        _say_unclaimed(merged, run)
    _warn_unverified([_check_or_warn(path, key) for path in paths])
    if as_json:
        for entry in shown:
            typer.echo(json.dumps(entry, separators=(",", ":")))
    else:
        _print_table(shown, len(paths))


def _say_unclaimed(events: list[dict[str, Any]], run: str) -> None:
    """On stderr: Flower runs of the run's app that no coordinator line names."""
    from wardround.ops.audit_query import run_identifiers

    unclaimed = sorted(run_identifiers(events, run).unclaimed)
    if unclaimed:
        typer.echo(
            f"note: Flower run(s) {', '.join(unclaimed)} ran this run's app and no "
            "coordinator line names them (run outside `wardround launch`, or the "
            "coordinator's log is not given or lost a line); their lines are shown, "
            "and the sites' ledgers charge them to the same approved run.",
            err=True,
        )


def _warn_unverified(checked: list[tuple[Path, Any]]) -> None:
    """Warn, on stderr, of every shown log whose chain does not verify."""
    for path, check in checked:
        if check is None or check.ok:
            continue
        where = f"at line {check.first_bad_line} " if check.first_bad_line else ""
        typer.echo(
            f"warning: audit log {path} fails verification {where}({check.problem}); "
            "its events may have been altered. Run `wardround audit --verify`.",
            err=True,
        )


def _check_or_warn(path: Path, key: Path | None) -> tuple[Path, Any]:
    """A log's verdict for the warning when showing it; None when it cannot be had."""
    from wardround.common.errors import ConfigError
    from wardround.ops.audit import verify_audit

    try:
        return path, verify_audit(path, key)
    except ConfigError as exc:
        typer.echo(f"warning: audit log {path} not verified: {exc.message}", err=True)
        return path, None


def _log_file(path: Path) -> Path:
    """The log named on the command line: a file, or ``audit.jsonl`` in a folder."""
    from wardround.common.errors import ConfigError
    from wardround.ops.audit import AUDIT_FILENAME

    if path.is_dir():
        inside = path / AUDIT_FILENAME
        if not inside.is_file():
            raise ConfigError(
                f"no {AUDIT_FILENAME} in folder {path}",
                hint="Give the audit log file, or the folder the daemon writes it to.",
            )
        return inside
    if not path.is_file():
        raise ConfigError(
            f"no audit log at {path}",
            hint=f"Give an {AUDIT_FILENAME} file or the folder that holds one.",
        )
    return path


def _event_filter(names: list[str] | None) -> list[str] | None:
    from wardround.common.errors import ConfigError
    from wardround.ops.audit import AuditEvent

    if not names:
        return None
    wanted = [
        part.strip() for name in names for part in name.split(",") if part.strip()
    ]
    known = {e.value for e in AuditEvent}
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise ConfigError(
            f"unknown audit event {unknown[0]!r}",
            hint="Known events: " + ", ".join(e.value for e in AuditEvent) + ".",
        )
    return wanted


def _moment(text: str | None, option: str) -> datetime | None:
    from wardround.common.errors import ConfigError

    if text is None:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"{option} {text!r} is not an ISO-8601 date or time",
            hint="For example 2025-03-01, 2025-03-01T14:30 or 2025-03-01T14:30:00Z.",
        ) from None


def _report_checks(checks: list[tuple[Path, Any]], as_json: bool) -> None:
    """One verdict per log; exit 3 (DataError) naming the first broken one."""
    for path, check in checks:
        if as_json:
            typer.echo(json.dumps({"log": str(path), **asdict(check)}))
        elif check.ok:
            torn = (
                "; a torn last line (crash mid-write) is ignored"
                if check.torn_tail
                else ""
            )
            older = (
                f"; lines 1-{check.unkeyed_lines} predate keying (sha256), sealed "
                f"by keyed line {check.unkeyed_lines + 1}"
                if check.unkeyed_lines
                else ""
            )
            typer.echo(
                f"ok      {path}: {check.lines} line(s), keyed chain intact"
                f"{older}{torn}"
            )
        elif check.first_bad_line is None:
            typer.echo(f"UNKEYED {path}: {check.lines} line(s): {check.problem}")
        else:
            typer.echo(f"BROKEN  {path}: line {check.first_bad_line}: {check.problem}")
    broken = [(path, check) for path, check in checks if not check.ok]
    if broken:
        from wardround.common.errors import DataError

        path, check = broken[0]
        where = (
            f"broken at line {check.first_bad_line}"
            if check.first_bad_line
            else ("unkeyed")
        )
        raise DataError(
            f"audit log {path} is {where}: {check.problem}",
            hint="Keep the file as evidence; compare it with its backups.",
        )


def _print_table(events: list[dict[str, Any]], logs: int) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 200)  # piped: one line per event, for grep
    if not events:
        console.print(Text(f"no matching audit events in {logs} log(s)"))
        return
    table = Table(show_edge=False, header_style="bold")
    for name in ("time", "actor", "event", "run"):
        table.add_column(name, no_wrap=True)
    table.add_column("site")
    table.add_column("details", overflow="fold")
    for entry in events:
        table.add_row(*_row(entry, Text))
    console.print(table)


def _row(entry: dict[str, Any], text: type[Text]) -> list[Text]:
    """One table row; every cell is plain Text, so ``[..]`` in a value is not markup."""
    site_key = "site" if "site" in entry else "sites" if "sites" in entry else None
    details = " ".join(
        f"{key}={_compact(value)}"
        for key, value in entry.items()
        if key not in _COLUMN_KEYS and key != site_key
    )
    cells = [
        entry.get("time"),
        entry.get("actor"),
        entry.get("event"),
        entry.get("run_id"),
        None if site_key is None else entry[site_key],
    ]
    return [text("" if cell is None else _compact(cell)) for cell in cells] + [
        text(details)
    ]


def _compact(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return ",".join(_compact(item) for item in value)
    if isinstance(value, dict):
        return ",".join(f"{key}:{_compact(item)}" for key, item in value.items())
    return json.dumps(value)
