"""Conversion of pretrained attention into collaborative form.

One stage per module, in pipeline order:

* `sites`: where attention layers sit in a model, and how they are swapped;
* `calibration`: what each layer sees on real data (`AttentionStatistics`);
* `attention`: one layer, by tensor decomposition (`convert_attention`);
* `model`: a whole model (`convert_model`), which runs the stages below;
* `refinement`: each converted layer fitted to the original's attention;
* `distillation`: the whole converted model fitted to the original's
  outputs (`distill`);
* `outputs`, `training`, `progress`: what those stages share.

Nothing here imports KerasHub: `keras_collab.hub` registers how KerasHub
models are rebuilt (`model.register_assembler`).
"""

from keras_collab.conversion.attention import AttentionConversion
from keras_collab.conversion.attention import convert_attention
from keras_collab.conversion.attention import is_convertible
from keras_collab.conversion.attention import parse_shared_key_dim
from keras_collab.conversion.calibration import AttentionStatistics
from keras_collab.conversion.distillation import distill
from keras_collab.conversion.model import ModelConversion
from keras_collab.conversion.model import convert_model
from keras_collab.conversion.model import find_sites
from keras_collab.conversion.refinement import refine_layers

__all__ = [
    "AttentionConversion",
    "AttentionStatistics",
    "ModelConversion",
    "convert_attention",
    "convert_model",
    "distill",
    "find_sites",
    "is_convertible",
    "parse_shared_key_dim",
    "refine_layers",
]
