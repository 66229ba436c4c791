"""Rendering helpers shared by the read-only commands (show, explain, ids, doctor).

Every command builds one JSON-able dict (its stable shape is documented in docs/cli.md)
and renders it either as JSON (``-o json``) or as plain-text tables (``-o table``).
Notes meant for a person (names unavailable, stale names) go to stderr in table mode, so
that the table itself can be piped; in JSON mode they are part of the document.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import click

FORMATS = ("table", "json")
JSON_VERSION = 1


def output_option(f: Callable) -> Callable:
    """The -o/--output option every read-only command takes."""
    return click.option(
        "-o", "--output", "fmt", type=click.Choice(FORMATS), default="table",
        show_default=True,
        help="table: for people; json: the stable, versioned shape of docs/cli.md.")(f)


def dump_json(data: Any) -> str:
    return json.dumps(data, indent=2, default=str)


def emit(data: dict, fmt: str, table: Callable[[dict], str]) -> None:
    """Print `data` as JSON, or as the text `table(data)` makes of it."""
    if fmt == "json":
        click.echo(dump_json(data))
    else:
        text = table(data)
        if text:
            click.echo(text.rstrip("\n"))


def note(message: str) -> None:
    """A remark for a person, on stderr (never mixed into a table or JSON on stdout)."""
    click.echo(message, err=True)


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def render_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *,
                 empty: str = "(none)", indent: str = "") -> str:
    """Left-aligned columns, two spaces apart; numbers right-aligned."""
    rows = [[cell(v) for v in row] for row in rows]
    if not rows:
        return f"{indent}{empty}"
    widths = [len(h) for h in headers]
    numeric = [False] * len(headers)
    text = [False] * len(headers)
    for row in rows:
        for i, v in enumerate(row):
            widths[i] = max(widths[i], len(v))
            if v == "-":
                continue
            if _is_number(v):
                numeric[i] = True
            else:
                text[i] = True
    numeric = [n and not t for n, t in zip(numeric, text, strict=True)]
    lines = []

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w)
                 for v, w, num in zip(values, widths, numeric, strict=True)]
        return (indent + "  ".join(parts)).rstrip()

    lines.append(line(list(headers)))
    lines.extend(line(row) for row in rows)
    return "\n".join(lines)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # not reached


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 0:
        return "0s"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def section(title: str, body: str) -> str:
    return f"{title}\n{body}"
