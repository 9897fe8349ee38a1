"""What every suite uses to run, time and report (no suite-specific code).

Nothing here imports Keras or a backend at module level: the parent process
of a `--backend-all` run only spawns one child per backend and merges their
results, and `KERAS_BACKEND` must be set before Keras is first imported. The
few helpers that need a backend library import it when called.

* `cli`: the options every suite takes, and the parsers of
  `python -m benchmarks`;
* `options`: a suite's own options, laid over its configuration;
* `run`: a suite's run on the backend of this process (`start_run`);
* `backends`: one subprocess per backend, and the merge of their results;
* `documents`: the layout of a result document, and merging documents;
* `metadata`: the machine, versions, date and command of a run;
* `threads`: the size of the BLAS/OpenMP pools;
* `result_files`: where results land; atomic JSON and text writing;
* `markdown`: tables, the environment and the errors of a report;
* `plots`: figures, saved atomically;
* `timing`: alternating calls and their medians;
* `memory`: peak memory of a pass, on CPU or an accelerator.
"""
