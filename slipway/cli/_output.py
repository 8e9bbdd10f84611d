"""Output helpers shared by CLI commands: rich tables for people, JSON for programs."""

from __future__ import annotations

import json
import sys
from typing import Any


def emit_json(data: Any) -> None:
    from slipway.registry.audit import jsonable

    sys.stdout.write(json.dumps(jsonable(data), indent=2, sort_keys=False) + "\n")


def console() -> Any:
    from rich.console import Console

    return Console(soft_wrap=False)


def table(title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.table import Table

    t = Table(title=title, show_lines=False, header_style="bold")
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*["" if v is None else str(v) for v in r])
    console().print(t)


def fmt_time(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else ""
