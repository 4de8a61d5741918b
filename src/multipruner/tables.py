"""The one table renderer of the package: aligned plain text for terminals, or Markdown for reports."""

from __future__ import annotations

from collections.abc import Sequence

_MARKDOWN_RULE = {"l": ":--", "r": "--:", "c": ":-:"}


def render_table(
    header: Sequence[str], rows: Sequence[Sequence[object]], align: str = "", markdown: bool = False
) -> str:
    """``align``: one letter per column, l / r / c (default: first column left, the others right)."""
    align = align or "l" + "r" * (len(header) - 1)
    cells = [[str(c) for c in header], *([str(c) for c in row] for row in rows)]
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in cells]
        lines.insert(1, "| " + " | ".join(_MARKDOWN_RULE[a] for a in align) + " |")
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        padded = (
            cell.ljust(w) if a == "l" else cell.center(w) if a == "c" else cell.rjust(w)
            for cell, w, a in zip(row, widths, align, strict=True)
        )
        return "  ".join(padded).rstrip()

    return "\n".join([line(cells[0]), line(["-" * w for w in widths]), *(line(r) for r in cells[1:])])
