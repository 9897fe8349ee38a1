"""Markdown of the reports: tables, the environment, the errors."""

import numpy as np

from benchmarks.harness.metadata import describe_device


def format_value(value, digits=3):
    """Formats a table cell: floats to `digits` significant digits."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if not np.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(headers, rows, digits=3):
    """A GitHub-flavoured Markdown table.

    Args:
        headers: Column titles. A title ending in `:` is right-aligned (the
            colon is not shown), for numbers.
        rows: Sequences of cell values, formatted with `format_value`.
        digits: Significant digits of float cells.

    Returns:
        The table, one line per row, ending with a newline.
    """
    titles = [header.rstrip(":") for header in headers]
    rules = ["---:" if header.endswith(":") else "---" for header in headers]
    lines = [
        "| " + " | ".join(titles) + " |",
        "| " + " | ".join(rules) + " |",
    ]
    for row in rows:
        cells = [
            format_value(value, digits).replace("|", "\\|") for value in row
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def environment_markdown(document):
    """Markdown lines describing the machine and software of each backend."""
    lines = []
    for backend, metadata in document["backends"].items():
        versions = metadata["versions"]
        lines.append(
            f"- **{backend}**: {describe_device(metadata)}; "
            f"keras {versions['keras']}, {backend} {versions.get(backend)}; "
            f"{metadata['date']}; {metadata.get('wall_time_s', '?')} s; "
            f"load average {metadata['load_average_at_start'][0]:.2f} at "
            f"start; `{metadata['command']}`"
        )
    return "\n".join(lines) + "\n"


def errors_markdown(document):
    """A Markdown list of the errors recorded in `document`, or ``""``."""
    if not document["errors"]:
        return ""
    lines = ["", "## Errors", ""]
    for error in document["errors"]:
        where = ", ".join(
            f"{key}={value}"
            for key, value in error.items()
            if key != "message" and value is not None
        )
        message = " ".join(str(error["message"]).split())[:300]
        lines.append(f"- {where}: {message}")
    return "\n".join(lines) + "\n"
