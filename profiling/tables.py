"""Reading the CSV that nsys and ncu print, and writing markdown tables."""

import csv
import io


def read_csv(text: str, first_column: str, source: str) -> list:
    """Rows (dicts) of the CSV table in `text` whose header starts with `first_column`. Lines before
    the header (the tools' progress lines, the profiled program's own output) are skipped.
    source: what the text is, for the error when no header is found."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if (next(csv.reader([line])) or [None])[0] == first_column:
            return list(csv.DictReader(io.StringIO("\n".join(lines[i:]))))
    raise ValueError(f"{source}: expected a CSV table whose first column is {first_column!r}, found none")


def number(text) -> float | None:
    """A value of the tools' CSV: thousands separators dropped; None for an empty cell or 'n/a'."""
    text = (text or "").strip().replace(",", "")
    if text in ("", "n/a", "N/A", "None"):
        return None
    return float(text)


def markdown(header: list, rows: list) -> str:
    """A markdown table; floats with one decimal."""
    def cell(value):
        return f"{value:,.1f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
