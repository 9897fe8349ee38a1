"""Command-line options of the suites, laid over their configurations."""

import argparse


def integers(text):
    """Parses an option of comma-separated integers, e.g. `96,192`.

    `""` gives `[]`, so that a list option can be emptied on the command line.
    """
    return [int(item) for item in text.split(",") if item.strip()]


def integers_or_none(text):
    """Parses comma-separated positive integers where `none` stands for
    `None`, e.g. `none,192,96` (a size axis whose `None` keeps the
    original's structure, such as per-head values).

    Raises:
        argparse.ArgumentTypeError: naming an entry that is neither.
    """
    values = []
    for item in (part.strip() for part in text.split(",")):
        if item.lower() == "none":
            values.append(None)
        elif item:
            values.append(positive_integer(item))
    return values


def positive_integer(text):
    """Parses one positive integer, or raises `argparse.ArgumentTypeError`
    naming the entry."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer or 'none'; received {text!r}"
        )
    return value


def dimension_points(text):
    """Parses `--points`: comma-separated `D̃:D̃_v` (shared values of size
    D̃_v), `D̃:none` or `D̃` (per-head values), e.g. `192:192,96:none`.

    Returns:
        A list of `[D̃, D̃_v]` pairs, D̃_v `None` for per-head values (lists,
        as they are written to the result's configuration).

    Raises:
        argparse.ArgumentTypeError: naming an entry that is none of these.
    """
    entries = []
    for item in (part.strip() for part in text.split(",")):
        if item:
            entries.append(_dimension_point(item))
    return entries


def _dimension_point(item):
    key, separator, value = (part.strip() for part in item.partition(":"))
    try:
        if not separator or value.lower() == "none":
            return [positive_integer(key), None]
        return [positive_integer(key), positive_integer(value)]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            "expected D̃, D̃:none or D̃:D̃_v with positive integers; "
            f"received {item!r}"
        ) from None


def add_threads_argument(parser):
    """Adds `--threads`, the size of the BLAS/OpenMP pools to run with.

    The suites that take it hand it to `threads.limit_cpu_threads`, after
    turning its 0 into `None`.
    """
    parser.add_argument(
        "--threads",
        type=int,
        help="BLAS/OpenMP threads (default 1; 0: leave as loaded).",
    )


def config_with_options(args, full, quick, options):
    """A suite's configuration: its `--quick` or full one, then its options.

    Args:
        args: The parsed command line; `args.quick` chooses the base.
        full: The suite's full configuration.
        quick: Its `--quick` configuration.
        options: The attributes of `args` that override the configuration
            key of the same name, or a mapping from such an attribute to the
            key it overrides. An option that was not given (`None`) keeps
            the base value.

    Returns:
        A new dict: `full` and `quick` stay as they are for the next run.
    """
    config = dict(quick if args.quick else full)
    if not isinstance(options, dict):
        options = {option: option for option in options}
    for option, key in options.items():
        value = getattr(args, option, None)
        if value is not None:
            config[key] = value
    return config
