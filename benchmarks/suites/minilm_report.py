"""Report pieces shared by the `fidelity` and `pruning` suites.

Both compare ways of shrinking the query/key side of the real
all-MiniLM-L6-v2, one row per backend, D̃ (`shared_key_dim`) and method, by
how close the held-out embeddings stay to the original's. Needs matplotlib,
no backend.
"""

import os
import warnings

from benchmarks.harness.plots import label_dimensions
from benchmarks.harness.plots import new_figure
from benchmarks.harness.plots import save_figure
from benchmarks.harness.result_files import write_text


def write(document, output_dir, stem, methods, markdown, plot):
    """Writes `<stem>.md` and, where a method was measured, `<stem>.png`.

    The suite's Markdown and figure get the rows sorted by backend, D̃,
    D̃_v (`shared_value_dim`: per-head values first) and method. The
    figure is left out when no row has a `mean_cosine` (every method run
    was skipped): there is nothing to draw.

    Args:
        document: The result document.
        output_dir: Where to write.
        stem: File name without its suffix.
        methods: The suite's methods, in the order of its tables.
        markdown: `markdown(document, rows)`, the suite's Markdown text.
        plot: `plot(rows, path)`, the suite's figure (see `plot` below).
    """
    rows = sorted(
        document["rows"],
        key=lambda r: (
            r["backend"],
            r["shared_key_dim"],
            _value_order(r.get("shared_value_dim")),
            methods.index(r["method"]),
        ),
    )
    write_text(os.path.join(output_dir, f"{stem}.md"), markdown(document, rows))
    if any("mean_cosine" in r for r in rows):
        plot(rows, os.path.join(output_dir, f"{stem}.png"))


def _value_order(shared_value_dim):
    """Per-head values (`None`) first, then shared values by size."""
    if shared_value_dim is None:
        return (0, 0)
    return (1, shared_value_dim)


def plot(rows, path, styles, xlabel, title, targets=()):
    """Writes the mean cosine to the original against D̃, one line per method.

    Left: the mean cosine; right: 1 - mean cosine on a log scale, where the
    differences between methods close to 1 show. One line per method and
    backend; a row without `mean_cosine` (a skipped method) draws nothing,
    but its D̃ still gets a tick.

    Args:
        rows: Result rows with `backend`, `method`, `shared_key_dim` and,
            where measured, `mean_cosine`.
        path: The PNG to write.
        styles: Mapping from each method, in legend order, to its matplotlib
            format string.
        xlabel: Label of the D̃ axes.
        title: Title of the figure.
        targets: `(D̃, mean cosine)` pairs, marked with a black bar where
            that D̃ was run.
    """
    figure, axes = new_figure(1, 2)
    _plot_methods(axes[0], rows, styles)
    _format_axes(axes[0], rows, xlabel, targets)
    figure.suptitle(title, fontsize=10)
    save_figure(figure, path)


def _plot_methods(axes, rows, styles):
    """One line per method and backend on both panels."""
    backends = sorted({r["backend"] for r in rows})
    for backend in backends:
        for method, style in styles.items():
            entries = sorted(
                (
                    r
                    for r in rows
                    if r["backend"] == backend
                    and r["method"] == method
                    and "mean_cosine" in r
                ),
                key=lambda r: r["shared_key_dim"],
            )
            if not entries:
                continue
            dims = [r["shared_key_dim"] for r in entries]
            label = method if len(backends) == 1 else f"{method} ({backend})"
            axes[0].plot(
                dims, [r["mean_cosine"] for r in entries], style, label=label
            )
            axes[1].plot(
                dims,
                [max(1.0 - r["mean_cosine"], 1e-9) for r in entries],
                style,
                label=label,
            )


def _format_axes(axes, rows, xlabel, targets):
    """Scales, labels, the ticks at every D̃ run and the target bars."""
    for ax, ylabel in zip(
        axes, ("mean cosine to original", "1 - mean cosine (log)")
    ):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    with warnings.catch_warnings():
        # A single point gives identical y limits; matplotlib widens them.
        warnings.simplefilter("ignore", UserWarning)
        axes[1].set_yscale("log")
    dims_run = sorted({r["shared_key_dim"] for r in rows})
    for ax in axes:
        label_dimensions(ax, dims_run)
    for dim, mean_cosine in targets:
        if dim in dims_run:
            axes[0].plot([dim], [mean_cosine], "k_", markersize=14)
            axes[1].plot([dim], [1 - mean_cosine], "k_", markersize=14)
