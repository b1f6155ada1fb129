"""Plain-text tables and numbers for the insight commands, in the demo's style."""

from __future__ import annotations

from typing import Sequence


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart, a dashed line under the header."""
    rows = [tuple(header), *map(tuple, rows)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def percent(value: float | None) -> str:
    return f"{value * 100:.1f}%" if value is not None else "-"


def sci(value: float | None) -> str:
    return f"{value:.1e}" if value is not None else "-"


def ms(value: float | None) -> str:
    return f"{value * 1000:.2f}" if value is not None else "-"
