"""The benchmark suites, one module each, registered in
`benchmarks/__main__.py`; and what only suites share.

* `layer_speed`: speed and peak memory of one attention layer, collaborative
  vs. Keras MHA; `memory_probe`: its peak-memory child process;
* `gpu`: `layer_speed` on every backend at the accelerator configuration;
* `training`: a character LM trained from scratch, collaborative vs.
  concatenated heads;
* `conversion`: time and error of the decomposition per layer;
* `fidelity`: held-out fidelity of the converted real MiniLM;
* `pruning`: pruning baselines at the collaborative key/query budget;
* `inference`: whole-model latency of converted encoders against
  their originals;
* `full_set`: `all`, every CPU suite one after the other;
* `minilm_report`: the report pieces `fidelity` and `pruning` share.

Suites import workloads and the harness, never the other way round.
"""
