"""The mathematics of collaborative attention, in NumPy only (no Keras).

* `cp`: the structured CP decomposition of per-head attention kernels by
  alternating least squares on the factored tensor, its error, and the
  search for the smallest rank that meets an error target;
* `weighting`: the input second moments that make it activation aware;
* `reference`: the published baseline (TensorLy PARAFAC), for comparisons.
"""

from keras_collab.decomposition.cp import CPResult
from keras_collab.decomposition.cp import collaborative_cp
from keras_collab.decomposition.cp import rank_for_target_error
from keras_collab.decomposition.cp import relative_error
from keras_collab.decomposition.reference import reference_parafac
from keras_collab.decomposition.weighting import WEIGHT_DAMPING
from keras_collab.decomposition.weighting import second_moment

__all__ = [
    "CPResult",
    "WEIGHT_DAMPING",
    "collaborative_cp",
    "rank_for_target_error",
    "reference_parafac",
    "relative_error",
    "second_moment",
]
