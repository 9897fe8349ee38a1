"""Figures of the reports: matplotlib on the Agg backend, saved atomically."""

from benchmarks.harness.result_files import write_atomically


def save_figure(figure, path):
    """Saves a matplotlib figure as PNG, atomically, and closes it."""
    import matplotlib.pyplot as plt

    try:
        return write_atomically(
            path,
            lambda file: figure.savefig(
                file, format="png", dpi=120, bbox_inches="tight"
            ),
        )
    finally:
        plt.close(figure)


def new_figure(num_rows, num_columns, panel_size=(4.5, 3.5)):
    """A figure of `num_rows x num_columns` panels, on the Agg backend."""
    import matplotlib

    # Headless machines have no display: render to files only.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(
        num_rows,
        num_columns,
        figsize=(panel_size[0] * num_columns, panel_size[1] * num_rows),
        squeeze=False,
        constrained_layout=True,
    )
    return figure, axes


def label_dimensions(ax, dims):
    """Ticks the x axis of `ax` at the measured sizes `dims` only.

    On a log-2 axis matplotlib labels the powers of two, as powers; the sizes
    measured (D̃, total key size) read better as the plain numbers they are.
    Call it after `set_xscale`, which resets the ticks.
    """
    import matplotlib.ticker

    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(dims))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
