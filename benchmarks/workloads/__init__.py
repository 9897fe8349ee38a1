"""What the suites measure: models, data and the pieces they apply.

* `attention_steps`: attention layers at a shape, and their compiled
  forward / forward+backward passes per backend (imports Keras);
* `char_lm`: a small causal Transformer character model and its training
  (imports Keras);
* `stdlib_text`: character-level text of Python's standard library;
* `minilm`: the real all-MiniLM-L6-v2 and what the conversion suites do to
  it (loading, timed fidelity, conversion, PARAFAC, distillation, copies);
* `compression`: budgets, magnitude masks, low-rank truncation, synthetic
  weights and factor writing (pure, unit-tested);
* `tfmot_prune`: TFMOT's magnitude masks, computed in a subprocess;
* `encoders`: the encoders the `inference` suite times and their
  structural conversions (imports Keras);
* `encoder_flops`: the FLOPs of an encoder, multi-head or collaborative
  (pure, unit-tested).

Workloads import the harness and keras_collab, never a suite.
"""
