"""The admin commands' tables (``wardround sites list``, ``wardround runs``).

Operators copy identifiers out of these tables (a node id into a firewall rule, a
run name into ``wardround stop``), so an identifier column is never cut or
wrapped, at 80 columns or piped. Long free text (a failure reason) is cut to
one line instead: ``wardround runs NAME`` shows it in full. Times are shown to
the second, in UTC, with a space where a narrow table may wrap them.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

FREE_TEXT_CHARS = 60
"""The most of a free-text cell a table shows (its first line, cut with "…")."""


def admin_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    *,
    identifiers: Collection[str] = (),
    free_text: Collection[str] = (),
    times: Collection[str] = (),
    where_in_full: str | None = None,
) -> Table:
    """A table of ``columns`` of ``rows``; ``identifiers`` are always shown whole.

    ``free_text`` cells show their first line, at most :data:`FREE_TEXT_CHARS`
    characters, on one line; when one is cut, ``where_in_full`` (say, the
    command that shows it whole) is the table's caption. ``times`` (ISO 8601)
    show as ``2026-12-07 04:01:31Z``. Other columns wrap when the console is
    narrow.
    """
    cut = any(
        _first_line(_cell(row, name)) != _cell(row, name)
        for row in rows
        for name in free_text
    )
    table = Table(caption=where_in_full if cut else None)
    for name in columns:
        if name in identifiers:
            # The header may wrap; the values may not, so the column is as wide
            # as its longest value and narrower columns give way instead.
            longest = max((len(_cell(row, name)) for row in rows), default=0)
            table.add_column(name, no_wrap=True, min_width=longest)
        else:
            table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(*(_shown(row, name, free_text, times) for name in columns))
    return table


def print_admin_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    *,
    identifiers: Collection[str] = (),
    free_text: Collection[str] = (),
    times: Collection[str] = (),
    where_in_full: str | None = None,
    console: Console | None = None,
) -> None:
    """Print :func:`admin_table` on ``console`` (stdout by default).

    When the identifiers leave the other columns no room (a 64-character site
    name at 80 columns), each row is printed as ``column: value`` lines instead:
    a table would drop or crop columns.
    """
    console = console or Console()
    table = admin_table(
        rows,
        columns,
        identifiers=identifiers,
        free_text=free_text,
        times=times,
        where_in_full=where_in_full,
    )
    needed = sum(
        max((len(_cell(row, name)) for row in rows), default=0)
        for name in identifiers
        if name in columns
    )
    # room for the borders and padding, and a few characters per other column
    room = console.width - 3 * len(columns) - 1 - 6 * (len(columns) - len(identifiers))
    if rows and needed > room:
        for row in rows:
            for name in columns:
                value = _shown(row, name, free_text, times)
                console.print(Text(f"{name}: ").append(value), soft_wrap=True)
            console.print()
        if table.caption is not None:  # a free-text cell was cut
            console.print(Text(str(table.caption)))
        return
    console.print(table)


def _cell(row: Mapping[str, Any], name: str) -> str:
    value = row.get(name)
    return "" if value is None else str(value)


def _shown(
    row: Mapping[str, Any],
    name: str,
    free_text: Collection[str],
    times: Collection[str],
) -> Text:
    # Plain Text: a value like "[ehr.features]" is not rich markup.
    value = _cell(row, name)
    if name in times:
        return Text(_utc_second(value))
    if name in free_text:
        return Text(_first_line(value), no_wrap=True, overflow="ellipsis")
    return Text(value)


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    first = lines[0].rstrip() if lines else ""
    if len(first) > FREE_TEXT_CHARS or len(lines) > 1:
        return first[: FREE_TEXT_CHARS - 1].rstrip() + "…"
    return first


def _utc_second(stamp: str) -> str:
    """``stamp`` as ``YYYY-MM-DD HH:MM:SSZ``; anything else (``N/A``) as it is."""
    try:
        moment = datetime.fromisoformat(stamp)
    except ValueError:
        return stamp
    if moment.tzinfo is not None:
        return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return moment.strftime("%Y-%m-%d %H:%M:%S")
