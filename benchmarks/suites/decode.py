"""Decoding speed of a converted GPT-2 with the compact collaborative cache.

A GPT-2-small-shaped `keras_hub.models.GPT2CausalLM` (random weights, no
preprocessor, greedy sampler) against its collaborative twins from
`keras_collab.convert_model(causal_lm, shared_key_dim=D̃)`, which decode
with one `(batch, 1, max_length, D̃ + H + H·d_v)` cache per layer where
KerasHub keeps `(batch, layers, 2, max_length, H, d)`, and, at the points
that ask for it, with shared values too (`shared_value_dim=D̃_v`: a cache of
`D̃ + H + D̃_v` per token and layer).

For each batch size and context (the length of the padded sequence
`generate()` gets: a prompt of `context - new_tokens` tokens, then
`new_tokens` generated ones), all models are timed in one process, in
alternation, medians compared, in three parts compiled the way KerasHub's
`make_generate_function` compiles `generate_step` (see
`benchmarks.workloads.gpt2_decode`):

- prefill: `_build_cache`, one pass over all `context` positions;
- decode: the sampler's loop, `new_tokens` greedy steps from a zero cache
  of the prefill's shape, minus the same call generating no token (its
  fixed cost: making the zero cache, dispatch); tokens per second of the
  decode phase = batch · new_tokens / that time;
- generate: `causal_lm.generate({"token_ids", "padding_mask"},
  stop_token_ids=None)` itself, end to end, as a check that prefill +
  decode add up to it.

Also: the cache bytes per sequence, measured from the prefill's cache
tensors, and the peak memory of the prefill and decode calls.

Results: `decode_<backend>.{json,md,png}`, or `decode_all.*` for
`--backend-all`.
"""

import gc
import os
import time

from benchmarks.harness.markdown import environment_markdown
from benchmarks.harness.markdown import errors_markdown
from benchmarks.harness.markdown import markdown_table
from benchmarks.harness.memory import MIB
from benchmarks.harness.memory import PeakMemoryTracker
from benchmarks.harness.metadata import detect_accelerator
from benchmarks.harness.options import config_with_options
from benchmarks.harness.options import dimension_points
from benchmarks.harness.options import integers
from benchmarks.harness.plots import label_dimensions
from benchmarks.harness.plots import new_figure
from benchmarks.harness.plots import save_figure
from benchmarks.harness.result_files import write_text
from benchmarks.harness.run import start_run
from benchmarks.harness.timing import TimingStats
from benchmarks.harness.timing import time_call
from benchmarks.workloads import compression

SUITE = "decode"
ORIGINAL = "original"
BYTES_PER_NUMBER = 4  # float32

# GPT-2 small ("gpt2_base_en"): 12 layers, 12 heads of 64, width 768, and
# its real vocabulary, whose output projection (38.6M of the 124M weights)
# every decoding step pays whatever the attention costs.
GPT2_SMALL = {
    "vocabulary_size": 50257,
    "num_layers": 12,
    "num_heads": 12,
    "hidden_dim": 768,
    "intermediate_dim": 3072,
    "max_sequence_length": 1024,
}
TINY = {
    "vocabulary_size": 256,
    "num_layers": 2,
    "num_heads": 4,
    "hidden_dim": 64,
    "intermediate_dim": 128,
    "max_sequence_length": 64,
}

# The targets: converted / original decode tokens per second at
# D̃ = 192, per (batch, context).
TARGET_SHARED_KEY_DIM = 192
TARGET_RATIOS = {(32, 1024): 1.15, (8, 1024): 1.0}

FULL = {
    "model": GPT2_SMALL,
    "batch_sizes": [1, 8, 32],
    "contexts": [256, 1024],
    "shared_key_dims": [768, 384, 192, 96],
    # (D̃, D̃_v) points run after `shared_key_dims`, D̃_v None for per-head
    # values: none by default, so that shared values add only what is asked.
    "points": [],
    "new_tokens": 16,
    # Timed calls per model, after one untimed (compiling) call each.
    "repeats": 5,
    "prefill_repeats": 2,
    # generate() end to end, as a check of prefill + decode: at batch 1
    # only, where it is cheap (each call repeats the prefill).
    "generate_batch_sizes": [1],
    "generate_repeats": 1,
    # Decomposition sweeps of the data-free conversion: speed does not
    # depend on how well the factors fit; 0 keeps the spectral start.
    "conversion_max_iter": 0,
    "memory": True,
    "deadline_s": None,
}
QUICK = {
    **FULL,
    "model": TINY,
    "batch_sizes": [2],
    "contexts": [32],
    "shared_key_dims": [64, 16],
    "new_tokens": 4,
    "repeats": 3,
    "prefill_repeats": 2,
    "generate_batch_sizes": [2],
    "generate_repeats": 1,
}

# Option -> configuration key.
_OPTIONS = {
    "batches": "batch_sizes",
    "contexts": "contexts",
    "dims": "shared_key_dims",
    "points": "points",
    "new_tokens": "new_tokens",
    "repeats": "repeats",
    "prefill_repeats": "prefill_repeats",
    "generate_batches": "generate_batch_sizes",
    "generate_repeats": "generate_repeats",
    "deadline_s": "deadline_s",
}


def add_arguments(parser):
    parser.add_argument(
        "--batches",
        type=integers,
        help="Comma-separated batch sizes (default 1,8,32; 2 with --quick).",
    )
    parser.add_argument(
        "--contexts",
        type=integers,
        help="Comma-separated contexts: prompt + new tokens (default "
        "256,1024; 32 with --quick). At most the model's 1024 positions.",
    )
    parser.add_argument(
        "--dims",
        type=integers,
        help="Comma-separated shared key sizes D̃ of the converted models "
        "(default 768,384,192,96; 64,16 with --quick), with per-head "
        "values; '' for none.",
    )
    parser.add_argument(
        "--points",
        type=dimension_points,
        help="Further converted models, after those of --dims: D̃:D̃_v "
        "(shared values of size D̃_v), D̃:none or D̃ (per-head values), "
        "e.g. 192:192,96:96 (default none). A point also in --dims is run "
        "once.",
    )
    parser.add_argument(
        "--new-tokens",
        type=int,
        help="Tokens generated per sequence (default 16; 4 with --quick).",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help="Timed decode calls per model and point (default 5).",
    )
    parser.add_argument(
        "--prefill-repeats",
        type=int,
        help="Timed prefill calls per model and point, after one untimed "
        "call (default 2): at long contexts the prefill costs most of the "
        "run.",
    )
    parser.add_argument(
        "--generate-batches",
        type=integers,
        help="Batch sizes at which generate() is also timed end to end, a "
        "check of prefill + decode (default 1; 2 with --quick; '' for "
        "none). Each call repeats the prefill.",
    )
    parser.add_argument(
        "--generate-repeats",
        type=int,
        help="Timed generate() calls per model at those batch sizes, after "
        "one untimed call (default 1).",
    )
    parser.add_argument(
        "--vocabulary-size",
        type=int,
        help="Vocabulary of the model (default GPT-2's 50257).",
    )
    parser.add_argument(
        "--no-memory",
        action="store_true",
        help="Skip the peak-memory measurements.",
    )
    parser.add_argument(
        "--deadline-s",
        type=float,
        help="Start no new (batch, context) point after this many seconds; "
        "the rest is recorded as skipped.",
    )


def resolve_config(args):
    config = config_with_options(args, FULL, QUICK, _OPTIONS)
    config["model"] = dict(config["model"])
    if getattr(args, "vocabulary_size", None):
        config["model"]["vocabulary_size"] = args.vocabulary_size
    if getattr(args, "no_memory", False):
        config["memory"] = False
    _check_config(config)
    return config


def _check_config(config):
    model = config["model"]
    full_rank = model["hidden_dim"]
    grid = converted_points(config)
    if not grid:
        raise ValueError(
            "No converted model to compare: give D̃ values in --dims or "
            "points in --points."
        )
    for dim, value_dim in grid:
        if not 0 < dim <= full_rank:
            raise ValueError(
                f"D̃={dim} must be between 1 and num_heads * key_dim = "
                f"{full_rank}"
            )
        if value_dim is not None and not 0 < value_dim <= full_rank:
            raise ValueError(
                f"D̃_v={value_dim} (point {dim}:{value_dim}) must be between "
                f"1 and num_heads * value_dim = {full_rank}"
            )
    for context in config["contexts"]:
        if context > model["max_sequence_length"]:
            raise ValueError(
                f"context {context} exceeds the model's "
                f"{model['max_sequence_length']} positions"
            )
        if not 0 < config["new_tokens"] < context:
            raise ValueError(
                f"--new-tokens {config['new_tokens']} must be between 1 and "
                f"context - 1 = {context - 1}"
            )
    for key in ("repeats", "prefill_repeats"):
        if config[key] < 1:
            raise ValueError(f"{key} must be at least 1")


def converted_points(config):
    """The converted models' `(D̃, D̃_v)`, in the order they are run: every
    D̃ of `shared_key_dims` with per-head values (D̃_v `None`), then the
    `points`; a point given twice is run once."""
    grid = [(dim, None) for dim in config["shared_key_dims"]]
    grid += [tuple(point) for point in config.get("points") or []]
    return list(dict.fromkeys(grid))


# ---------------------------------------------------------------------------
# Counts (no backend needed)
# ---------------------------------------------------------------------------


def head_dim(model):
    return model["hidden_dim"] // model["num_heads"]


def expected_cache_bytes(
    model, context, shared_key_dim=None, shared_value_dim=None
):
    """Cache bytes per sequence.

    The original's (`shared_key_dim=None`) is KerasHub's
    `2·H·d·layers·context·4`. The compact collaborative cache holds
    `layers·context·(D̃ + H + H·d_v)·4`: shared key, content-bias logits and
    values; with shared values (`shared_value_dim` D̃_v) the values are the
    shared `Ṽ`, `layers·context·(D̃ + H + D̃_v)·4`. The content-bias logits
    carry GPT-2's query bias below full size; at D̃ = H·d the conversion is
    exact, keeps the query bias in the shared query and has no content bias,
    so its cache holds `layers·context·(D̃ + H·d_v)·4` (as many numbers as
    KerasHub's) or `layers·context·(D̃ + D̃_v)·4`. The content bias depends
    on D̃ alone: the value side does not change it.
    """
    heads, layers = model["num_heads"], model["num_layers"]
    full = heads * head_dim(model)
    if shared_key_dim is None:
        if shared_value_dim is not None:
            raise ValueError(
                "shared_value_dim needs a shared_key_dim: the original "
                "keeps per-head values."
            )
        width = 2 * full
    else:
        values = full if shared_value_dim is None else shared_value_dim
        content_logits = 0 if shared_key_dim == full else heads
        width = shared_key_dim + content_logits + values
    return layers * context * width * BYTES_PER_NUMBER


def score_flop_factor(model, shared_key_dim):
    """How many times the original's attention-score FLOPs per token the
    collaborative layer spends: every head scores with all D̃ shared key
    dimensions instead of its own d_k."""
    return shared_key_dim / head_dim(model)


def target_ratio(batch_size, context, shared_key_dim, shared_value_dim=None):
    """The decode issue's target ratio at this point, else `None`: at
    D̃ = 192 with per-head values only."""
    if shared_key_dim != TARGET_SHARED_KEY_DIM or shared_value_dim is not None:
        return None
    return TARGET_RATIOS.get((batch_size, context))


def target_status(
    batch_size, context, shared_key_dim, ratio, shared_value_dim=None
):
    """`"PASS"`/`"MISS"` where the issue sets a target, else `None`."""
    target = target_ratio(batch_size, context, shared_key_dim, shared_value_dim)
    if target is None:
        return None
    if ratio is None:
        return "MISS"
    return "PASS" if ratio >= target else "MISS"


def model_name(shared_key_dim, shared_value_dim=None):
    """`original`, `collaborative_{D̃}` (per-head values) or
    `collaborative_{D̃}_v{D̃_v}` (shared values)."""
    if shared_key_dim is None:
        return ORIGINAL
    name = f"collaborative_{shared_key_dim}"
    if shared_value_dim is not None:
        name += f"_v{shared_value_dim}"
    return name


# ---------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------


def main(args):
    start = time.perf_counter()
    # Imported here: the backend must be chosen before Keras is imported.
    import keras

    backend = keras.backend.backend()
    accelerator = detect_accelerator(backend)
    config = resolve_config(args)
    run = start_run(SUITE, args, config, start, accelerator)
    models = _build_models(run, config)
    deadline = (
        None if config["deadline_s"] is None else start + config["deadline_s"]
    )
    for batch_size in config["batch_sizes"]:
        for context in config["contexts"]:
            where = {
                "backend": backend,
                "batch_size": batch_size,
                "context": context,
            }
            if deadline is not None and time.perf_counter() > deadline:
                run.document["errors"].append(
                    {**where, "message": "skipped: --deadline-s reached"}
                )
                continue
            print(f"decode {where}", flush=True)
            try:
                rows = _measure_point(models, config, where, accelerator)
            except Exception as error:  # Recorded; the next point runs.
                run.document["errors"].append(
                    {**where, "message": f"{type(error).__name__}: {error}"}
                )
                print(f"failed: {error!r}", flush=True)
                continue
            run.document["rows"].extend(rows)
            for row in rows:
                print(_progress_line(row), flush=True)
            run.save()
    return run.finish(report)


def _build_models(run, config):
    """The original and one converted model per (D̃, D̃_v) point, with
    their compiled prefill and decode functions."""
    from benchmarks.workloads import gpt2_decode

    original = gpt2_decode.build_causal_lm(config["model"])
    models = {ORIGINAL: _Model(original, None, None, 0.0)}
    conversion_s = {}
    for dim, value_dim in converted_points(config):
        name = model_name(dim, value_dim)
        values = "" if value_dim is None else f", D̃_v={value_dim}"
        print(f"converting to D̃={dim}{values}", flush=True)
        converted, seconds = gpt2_decode.convert(
            original, dim, config["conversion_max_iter"], value_dim
        )
        models[name] = _Model(converted, dim, value_dim, seconds)
        conversion_s[name] = seconds
    run.document["config"][run.backend]["conversion_s"] = conversion_s
    return models


class _Model:
    """A causal LM of the grid and its compiled pieces."""

    def __init__(
        self, causal_lm, shared_key_dim, shared_value_dim, conversion_s
    ):
        from benchmarks.workloads import gpt2_decode

        self.causal_lm = causal_lm
        self.shared_key_dim = shared_key_dim
        self.shared_value_dim = shared_value_dim
        self.conversion_s = conversion_s
        self.prefill = gpt2_decode.prefill_function(causal_lm)
        self.decode = gpt2_decode.decode_function(causal_lm)
        # What the converted layers say they cache per token (None for the
        # original): a check of the measured cache and the formula.
        self.cache_counts = None
        if shared_key_dim is not None:
            self.cache_counts = compression.decode_cache(
                gpt2_decode.attention_layers(causal_lm)
            )


class _Call:
    """A timeable call that remembers its first call (compilation
    included) and, on the second, its peak memory and outputs' bytes."""

    def __init__(self, function, tracker=None, describe=None):
        self.function = function
        self.tracker = tracker
        self.describe = describe
        self.calls = 0
        self.first_call_s = None
        self.peak_bytes = None
        self.description = None

    def __call__(self):
        self.calls += 1
        if self.calls == 1:
            start = time.perf_counter()
            outputs = self.function()
            self.first_call_s = time.perf_counter() - start
            if self.describe is not None:
                self.description = self.describe(outputs)
            return
        if self.calls == 2 and self.tracker is not None:
            self.tracker.start()
            self.function()
            self.peak_bytes = self.tracker.peak_growth_bytes()
            return
        self.function()


def _memory_tracker(config, backend, accelerator):
    """A `PeakMemoryTracker` where the peak can be reset in this process,
    else `None` (JAX on an accelerator)."""
    if not config["memory"]:
        return None
    tracker = PeakMemoryTracker(backend, accelerator["kind"])
    return tracker if tracker.resettable else None


def _measure_point(models, config, where, accelerator):
    from benchmarks.workloads import gpt2_decode

    batch_size, context = where["batch_size"], where["context"]
    on_accelerator = accelerator["kind"] != "cpu"
    tracker = _memory_tracker(config, where["backend"], accelerator)
    inputs = gpt2_decode.prompts(
        batch_size,
        context,
        config["new_tokens"],
        config["model"]["vocabulary_size"],
    )
    decode_inputs = gpt2_decode.to_tensors(inputs)
    zero_inputs = gpt2_decode.to_tensors(gpt2_decode.decode_zero_tokens(inputs))
    token_ids = decode_inputs["token_ids"]

    def prefill_call(model):
        def call():
            outputs = model.prefill(token_ids)
            gpt2_decode.synchronise(outputs, on_accelerator)
            return outputs

        def describe(outputs):
            cache = outputs[1]
            return {
                "cache_bytes_per_sequence": gpt2_decode.tree_bytes(cache)
                // batch_size,
                "cache_shapes": gpt2_decode.tree_shapes(cache),
            }

        return _Call(call, tracker, describe)

    def decode_call(model, arguments, measure=True):
        def call():
            outputs = model.decode(arguments)
            gpt2_decode.synchronise(outputs, on_accelerator)
            return outputs

        return _Call(call, tracker if measure else None)

    prefill = {name: prefill_call(model) for name, model in models.items()}
    stats = {"prefill": _time(prefill, config["prefill_repeats"])}
    gpt2_decode.release_memory()
    decode = {}
    for name, model in models.items():
        decode[f"{name}/decode"] = decode_call(model, decode_inputs)
        decode[f"{name}/zero"] = decode_call(model, zero_inputs, False)
    decode_stats = _time(decode, config["repeats"])
    gpt2_decode.release_memory()
    generate_stats = {}
    if (
        config["generate_repeats"] > 0
        and batch_size in config["generate_batch_sizes"]
    ):
        generate = {
            name: _Call(_generate_call(model.causal_lm, inputs))
            for name, model in models.items()
        }
        generate_stats = _time(generate, config["generate_repeats"])
        gpt2_decode.release_memory()
    return _point_rows(
        models,
        config,
        where,
        accelerator,
        tracker,
        prefill,
        stats["prefill"],
        decode,
        decode_stats,
        generate_stats,
    )


def _generate_call(causal_lm, inputs):
    def call():
        # generate() brings its outputs to NumPy: the work is finished.
        return causal_lm.generate(dict(inputs), stop_token_ids=None)

    return call


def _time(calls, repeats):
    """Medians of `repeats` timed rounds, after one untimed round (the
    calls' first, compiling, call).

    As `harness.timing.time_alternating` (rounds of one call each, in an
    order that rotates), except for the garbage collector: it collects
    before every call, outside the clock, and stays on during the call, as
    in a user's `generate()`. On PyTorch every `keras.tree` flattening
    leaves a reference cycle (`torch.utils._pytree.tree_flatten`'s
    recursive helper) that holds the flattened tensors until a collection:
    with the collector paused through the rounds, GPT-2 small at batch 8,
    context 1024 grew past 23 GiB and was killed.
    """
    names = list(calls)
    for name in names:
        gc.collect()
        calls[name]()
    samples = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            samples[name].append(time_call(calls[name]))
    gc.collect()
    return {
        name: TimingStats.from_samples(values)
        for name, values in samples.items()
    }


def _point_rows(
    models,
    config,
    where,
    accelerator,
    tracker,
    prefill,
    prefill_stats,
    decode,
    decode_stats,
    generate_stats,
):
    batch_size, context = where["batch_size"], where["context"]
    new_tokens = config["new_tokens"]
    rows = []
    for name, model in models.items():
        dim, value_dim = model.shared_key_dim, model.shared_value_dim
        counts = model.cache_counts or {}
        call_s = decode_stats[f"{name}/decode"].median_s
        fixed_s = decode_stats[f"{name}/zero"].median_s
        decode_s = max(call_s - fixed_s, 1e-12)
        prefill_s = prefill_stats[name].median_s
        generate = generate_stats.get(name)
        description = prefill[name].description
        row = {
            "kind": "decode",
            **where,
            "device": accelerator["kind"],
            "device_name": accelerator["name"],
            "model": ORIGINAL if dim is None else "collaborative",
            "shared_key_dim": dim,
            "shared_value_dim": value_dim,
            "new_tokens": new_tokens,
            "prompt_length": context - new_tokens,
            "decode_s": decode_s,
            "decode_call_s": call_s,
            "decode_call_p25_s": decode_stats[f"{name}/decode"].p25_s,
            "decode_call_p75_s": decode_stats[f"{name}/decode"].p75_s,
            "decode_fixed_s": fixed_s,
            "decode_ms_per_step": 1e3 * decode_s / new_tokens,
            "decode_tokens_per_s": batch_size * new_tokens / decode_s,
            "repeats": decode_stats[f"{name}/decode"].repeats,
            "prefill_s": prefill_s,
            "prefill_p25_s": prefill_stats[name].p25_s,
            "prefill_p75_s": prefill_stats[name].p75_s,
            "prefill_tokens_per_s": batch_size * context / prefill_s,
            "prefill_repeats": prefill_stats[name].repeats,
            "prefill_first_call_s": prefill[name].first_call_s,
            "decode_first_call_s": decode[f"{name}/decode"].first_call_s,
            "generate_s": None if generate is None else generate.median_s,
            "generate_repeats": 0 if generate is None else generate.repeats,
            "prefill_plus_decode_s": prefill_s + decode_s,
            "cache_bytes_per_sequence": description["cache_bytes_per_sequence"],
            "cache_bytes_expected": expected_cache_bytes(
                config["model"], context, dim, value_dim
            ),
            # Numbers per token over all layers, from the layers' sizes.
            "cache_per_token": counts.get("cache_per_token"),
            "value_cache_share": counts.get("value_cache_share"),
            "cache_shapes": description["cache_shapes"],
            "prefill_peak_bytes": prefill[name].peak_bytes,
            "decode_peak_bytes": decode[f"{name}/decode"].peak_bytes,
            "memory_method": None if tracker is None else tracker.method,
            "conversion_s": model.conversion_s,
        }
        rows.append(row)
    original = rows[0]
    for row in rows[1:]:
        _add_ratios(row, original, config["model"])
    return rows


def _add_ratios(row, original, model):
    """Converted / original, and the target where the issue sets one."""
    dim, value_dim = row["shared_key_dim"], row["shared_value_dim"]
    ratio = row["decode_tokens_per_s"] / original["decode_tokens_per_s"]
    row["ratio"] = ratio
    row["prefill_ratio"] = original["prefill_s"] / row["prefill_s"]
    row["cache_ratio"] = (
        row["cache_bytes_per_sequence"] / original["cache_bytes_per_sequence"]
    )
    row["score_flop_factor"] = score_flop_factor(model, dim)
    where = (row["batch_size"], row["context"], dim)
    row["target_ratio"] = target_ratio(*where, value_dim)
    row["status"] = target_status(*where, ratio, value_dim)


def _progress_line(row):
    name = model_name(row["shared_key_dim"], row.get("shared_value_dim"))
    ratio = row.get("ratio")
    return (
        f"  {name}: decode {row['decode_tokens_per_s']:.1f} tokens/s"
        + ("" if ratio is None else f" ({ratio:.2f}x)")
        + f", prefill {row['prefill_s']:.3f} s, cache "
        f"{row['cache_bytes_per_sequence'] / MIB:.2f} MiB/sequence"
    )


# ---------------------------------------------------------------------------
# Report (no backend needed)
# ---------------------------------------------------------------------------


def report(document, output_dir, stem):
    """Writes the Markdown tables and the plot of a result document."""
    write_text(os.path.join(output_dir, f"{stem}.md"), _markdown(document))
    rows = [row for row in document["rows"] if row["kind"] == "decode"]
    if any(row.get("ratio") is not None for row in rows):
        _plot(rows, os.path.join(output_dir, f"{stem}.png"))


def _document_model(document):
    config = next(iter(document["config"].values()), FULL)
    return config.get("model", FULL["model"]), config


def _markdown(document):
    rows = [row for row in document["rows"] if row["kind"] == "decode"]
    model, config = _document_model(document)
    quick = " (--quick)" if document["metadata"]["quick"] else ""
    d = head_dim(model)
    parts = [
        f"# decode: KerasHub GPT-2 generate(), original vs. collaborative"
        f"{quick}",
        "",
        f"`GPT2CausalLM`, {model['num_layers']} layers, H = "
        f"{model['num_heads']} heads of d = {d}, width {model['hidden_dim']}, "
        f"MLP {model['intermediate_dim']}, vocabulary "
        f"{model['vocabulary_size']}, random weights, float32, greedy, no "
        "stop tokens; converted data-free with `convert_model(causal_lm, "
        "shared_key_dim=D̃)`, or `shared_value_dim=D̃_v` too where D̃_v is "
        "given (shared values; 'per head' otherwise). Context = prompt + "
        f"new tokens ({config.get('new_tokens')} new). Decode tokens/s = "
        "batch · new tokens / decode time: the sampler loop from a zero "
        "cache, minus the same call generating no token; prefill "
        "(`_build_cache` over the whole context) timed apart. Medians of "
        "calls alternating between all models of a point; ratio = converted "
        "/ original decode tokens/s. Cache = bytes per sequence measured on "
        "the prefill's cache tensors (original: 2·H·d·layers·context·4; "
        "compact: layers·context·(D̃ + H + H·d)·4, or (D̃ + H + D̃_v) with "
        "shared values, without the H content logits at full size D̃ = H·d, "
        "where the query/key conversion is exact); values share = the "
        "values' part of the compact cache.",
        "",
        environment_markdown(document),
        f"## Targets (D̃ = {TARGET_SHARED_KEY_DIM}, per-head values)",
        "",
        _targets_table(rows),
        "## Decode",
        "",
        _decode_table(rows),
        _MEMORY_NOTE,
        "## Where collaboration loses",
        "",
        _losses_text(rows, model),
    ]
    return "\n".join(parts) + errors_markdown(document)


_MEMORY_NOTE = """\
Generate = `generate()` end to end (prefill and decode in one compiled
program on JAX and TensorFlow, eager on PyTorch), beside prefill + decode.
Peak memory is the growth of the peak during one (timed, not the first)
prefill or decode call over what lived before it: on a CPU the process's
peak resident set size (Linux VmHWM, reset before the call), which misses
memory the C allocator (or the backend's) already held from earlier calls,
so it is a lower bound, noisy for small calls; on a GPU the allocator's
peak bytes in use (PyTorch, TensorFlow). JAX's accelerator peak cannot be
reset: not measured there. The garbage collector runs before every call,
outside the clock, and stays on during it.
"""


def _targets_table(rows):
    checks = [
        (
            row["backend"],
            row["batch_size"],
            row["context"],
            row["ratio"],
            f"≥ {row['target_ratio']}",
            row["status"],
        )
        for row in rows
        if row.get("status") is not None
    ]
    passed = sum(check[-1] == "PASS" for check in checks)
    expected = len(TARGET_RATIOS) * len({row["backend"] for row in rows})
    note = f"\n{passed} of {len(checks)} target checks pass."
    if len(checks) < expected:
        note += (
            " Not every target point was measured: batch 32 and batch 8 at "
            f"context 1024, D̃ = {TARGET_SHARED_KEY_DIM}, on each backend."
        )
    return (
        markdown_table(
            ["backend", "batch:", "context:", "ratio:", "target", "status"],
            checks,
        )
        + note
        + "\n"
    )


def _decode_table(rows):
    table = []
    for row in rows:
        table.append(
            (
                row["backend"],
                row["batch_size"],
                row["context"],
                row["shared_key_dim"] or ORIGINAL,
                _value_cell(row),
                row["decode_tokens_per_s"],
                row.get("ratio"),
                row["decode_ms_per_step"],
                row["prefill_s"],
                row.get("prefill_ratio"),
                row["prefill_plus_decode_s"],
                row["generate_s"],
                row["cache_bytes_per_sequence"] / MIB,
                row.get("cache_ratio"),
                row.get("value_cache_share"),
                _mib(row["prefill_peak_bytes"]),
                _mib(row["decode_peak_bytes"]),
                row.get("status") or "",
            )
        )
    return markdown_table(
        [
            "backend",
            "batch:",
            "context:",
            "D̃:",
            "D̃_v:",
            "decode tokens/s:",
            "ratio:",
            "ms/step:",
            "prefill s:",
            "prefill speed-up:",
            "prefill + decode s:",
            "generate s:",
            "cache MiB/seq:",
            "cache ratio:",
            "values share:",
            "prefill peak MiB:",
            "decode peak MiB:",
            "target",
        ],
        table,
    )


def _mib(value):
    return None if value is None else value / MIB


def _value_cell(row):
    """The D̃_v column: `""` for the original, `per head` or D̃_v."""
    if row["shared_key_dim"] is None:
        return ""
    value = row.get("shared_value_dim")
    return "per head" if value is None else value


def _point_text(row):
    """`D̃ 192` or `D̃ 192 D̃_v 96`, for sentences."""
    text = f"D̃ {row['shared_key_dim']}"
    value = row.get("shared_value_dim")
    return text if value is None else f"{text} D̃_v {value}"


def _losses_text(rows, model):
    d = head_dim(model)
    heads, full = model["num_heads"], model["hidden_dim"]
    losses = [
        row
        for row in rows
        if row.get("ratio") is not None and row["ratio"] < 1.0
    ]
    lines = [
        "Collaborative attention scores every head against all D̃ "
        f"dimensions of the shared key instead of the head's own d_k = {d}: "
        f"the score FLOPs per token grow by D̃/d_k ({_factors(rows, d)}), "
        "plus the mixing. What it saves is cache traffic: per token and "
        "layer the compact cache holds D̃ + H + H·d numbers (D̃ + H·d at "
        "full size; D̃ + H + D̃_v with shared values) where KerasHub's "
        "holds 2·H·d, and each layer's cache is a tensor of its own, where "
        "KerasHub slices every layer's cache out of one (batch, layers, 2, "
        "...) tensor and stacks them back every step (a copy of the whole "
        "cache in eager PyTorch; XLA may update it in place). So it loses "
        "where the cache is small next to the weights "
        "every step reads: short context and batch 1, where decoding is "
        "bound by the weights (and the vocabulary projection), and at large "
        "D̃, where the extra score FLOPs outweigh a cache no smaller than "
        f"the original's (D̃ = {full} keeps a cache as large as KerasHub's: "
        f"its ratio is the layout alone against {heads}x the score FLOPs).",
        "",
    ]
    if losses:
        points = ", ".join(
            f"{row['backend']} batch {row['batch_size']} context "
            f"{row['context']} {_point_text(row)} ({row['ratio']:.2f}x)"
            for row in losses
        )
        lines.append(f"Measured slower than the original: {points}.")
    elif rows:
        lines.append("No measured point is slower than the original.")
    return "\n".join(lines) + "\n"


def _factors(rows, d):
    dims = sorted(
        {row["shared_key_dim"] for row in rows if row["shared_key_dim"]}
    )
    if not dims:
        return "no converted model measured"
    return ", ".join(f"{dim / d:g}x at D̃ = {dim}" for dim in dims)


def _plot(rows, path):
    """Decode and prefill ratios against D̃, one column per backend: one
    colour per (batch, context), solid for per-head values, dashed through
    the shared-value points (each labelled with its D̃_v)."""
    backends = sorted({row["backend"] for row in rows})
    points = sorted({(row["batch_size"], row["context"]) for row in rows})
    figure, axes = new_figure(2, len(backends))
    for column, backend in enumerate(backends):
        for line, (key, title) in enumerate(
            [
                ("ratio", "decode tokens/s, converted / original"),
                ("prefill_ratio", "prefill speed, converted / original"),
            ]
        ):
            ax = axes[line][column]
            for index, (batch_size, context) in enumerate(points):
                _plot_point(ax, rows, backend, batch_size, context, key, index)
            _format_panel(ax, rows, backend, f"{backend}: {title}")
    figure.suptitle(
        f"Converted / original (x: target, D̃ = {TARGET_SHARED_KEY_DIM} "
        "per-head values); dashed: shared values; grey: parity",
        fontsize=10,
    )
    save_figure(figure, path)


def _plot_point(ax, rows, backend, batch_size, context, key, index):
    rows = [
        row
        for row in rows
        if row["backend"] == backend
        and (row["batch_size"], row["context"]) == (batch_size, context)
        and row.get(key) is not None
    ]
    color = f"C{index % 10}"
    label = f"batch {batch_size}, context {context}"
    per_head = [row for row in rows if row.get("shared_value_dim") is None]
    shared = [row for row in rows if row.get("shared_value_dim") is not None]
    for group, style, suffix in (
        (per_head, "o-", ""),
        (shared, "s--", ", shared values"),
    ):
        group.sort(key=lambda row: (row["shared_key_dim"], _value_key(row)))
        if not group:
            continue
        dims = [row["shared_key_dim"] for row in group]
        values = [row[key] for row in group]
        ax.plot(dims, values, style, color=color, label=label + suffix)
    for row in shared:
        ax.annotate(
            f"v{row['shared_value_dim']}",
            (row["shared_key_dim"], row[key]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=6,
            color=color,
        )
    target = TARGET_RATIOS.get((batch_size, context))
    if key == "ratio" and target is not None and per_head:
        ax.plot(
            [TARGET_SHARED_KEY_DIM], [target], "x", color=color, markersize=9
        )


def _value_key(row):
    value = row.get("shared_value_dim")
    return -1 if value is None else value


def _format_panel(ax, rows, backend, title):
    dims = sorted(
        {
            row["shared_key_dim"]
            for row in rows
            if row["backend"] == backend and row["shared_key_dim"]
        }
    )
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    if dims:
        label_dimensions(ax, dims)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("shared key size D̃")
    ax.set_ylabel("converted / original")
    ax.legend(fontsize=7)
