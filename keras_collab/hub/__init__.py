"""KerasHub integration: the only code in keras-collab that imports
`keras_hub`.

* `twins`: registered `Collaborative<X>` twins of KerasHub backbones, tasks,
  preprocessors and tokenizers, so that converted presets reload through
  KerasHub's own loaders; and the assembler `convert_model` uses for
  KerasHub models;
* `sources`: loading what `keras-collab convert` converts;
* `text`: the built-in corpus, calibration/held-out texts, and encoding;
* `fidelity`: converted outputs against the original's;
* `preset_files`: atomic preset folders and the conversion report.

Importing this package registers the twins (`import keras_collab` does it
when KerasHub is installed).
"""

from keras_collab.hub import twins  # noqa: F401 (registers the twins)
from keras_collab.hub.fidelity import Fidelity
from keras_collab.hub.fidelity import fidelity
from keras_collab.hub.sources import load_source

__all__ = ["Fidelity", "fidelity", "load_source"]
