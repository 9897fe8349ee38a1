"""A progress bar over long loops (layers, refinement steps)."""

import keras


def progress_bar(items, description, enabled=True):
    """Yields `items`, showing Keras' progress bar when `enabled`.

    Keras' `Progbar` is already a dependency and prints to stdout like
    `fit()` does, so conversions look like the rest of Keras.
    """
    items = list(items)
    if not enabled or not items:
        yield from items
        return
    print(description)
    bar = keras.utils.Progbar(len(items), unit_name="layer")
    for index, item in enumerate(items):
        yield item
        bar.update(index + 1)
