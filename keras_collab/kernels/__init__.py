"""Backend-specific attention kernels, each tested against the layer's
generic `keras.ops` path. Nothing else in keras-collab imports a backend.

* `torch_blocked_attention`: cache-blocked collaborative attention for
  PyTorch on CPU (imported lazily by the layer: it imports torch).
"""
