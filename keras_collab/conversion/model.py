"""Conversion of whole models: every attention layer, in one call.

`convert_model` is a pipeline that reads top to bottom. It finds the
attention sites of the model once and hands them on, stage to stage:

1. `find_sites`: the Keras `MultiHeadAttention` layers (KerasHub subclasses
   such as `CachedMultiHeadAttention` included);
2. `collect_statistics` (with calibration data): what each site sees;
3. `convert_sites`: each layer re-parametrized (`conversion.attention`);
4. `assemble`: a new model with the converted layers in place;
5. optionally `refine_layers` and `distill` on the calibration data.

The original model is never modified. How a model is rebuilt depends on its
kind: plain functional and sequential models are cloned here; other kinds
(KerasHub backbones and tasks) register an assembler with
`register_assembler`, which `keras_collab.hub` does on import, so that this
module knows nothing of KerasHub.
"""

import contextlib
import dataclasses
import os
from concurrent import futures

import keras

from keras_collab.conversion import sites as sites_lib
from keras_collab.conversion.attention import build_conversion
from keras_collab.conversion.attention import decompose_attention
from keras_collab.conversion.attention import is_convertible
from keras_collab.conversion.calibration import collect_statistics
from keras_collab.conversion.distillation import distill
from keras_collab.conversion.progress import StageClock
from keras_collab.conversion.progress import progress_bar
from keras_collab.conversion.refinement import refine_layers


@dataclasses.dataclass
class ModelConversion:
    """The outcome of `convert_model`.

    Attributes:
        model: The converted model (a new object).
        layers: `{site path: AttentionConversion}` in conversion order; the
            `layer` of each is the one now inside `model`.
        seconds: Wall time of the conversion (calibration, decomposition,
            assembly, refinement, distillation; model loading excluded).
        stage_seconds: The wall time of each stage
            (`keras_collab.conversion.progress.StageClock.seconds`: one
            entry per stage, `other` and `total`, which equals `seconds`).
        refinement: `{site path: {"loss_before", "loss_after"}}` when refined.
        distillation: What `keras_collab.distill` returned, when distilled.
    """

    model: keras.Model
    layers: dict
    seconds: float
    refinement: dict = dataclasses.field(default_factory=dict)
    distillation: dict = dataclasses.field(default_factory=dict)
    stage_seconds: dict = dataclasses.field(default_factory=dict)

    @property
    def qk_params_before(self):
        return sum(c.qk_params_before for c in self.layers.values())

    @property
    def qk_params_after(self):
        return sum(c.qk_params_after for c in self.layers.values())


def find_sites(model):
    """The convertible attention sites of `model`, each once."""
    return sites_lib.find_attention_sites(model, is_convertible)


def _for_site(spec, path, name):
    """A per-site value of `spec`, which may map site paths to values."""
    if isinstance(spec, dict):
        if path not in spec:
            raise ValueError(
                f"`{name}` has no entry for attention layer '{path}'. "
                f"Received keys: {sorted(spec)}"
            )
        return spec[path]
    return spec


def convert_sites(
    sites,
    shared_key_dim=None,
    *,
    shared_value_dim=None,
    statistics=None,
    target_error=None,
    value_target_error=None,
    seed=0,
    tol=1e-6,
    max_iter=300,
    progress=False,
):
    """Converts the layer of every site (`convert_attention`).

    Args:
        sites: `AttentionSite`s, from `find_sites`.
        shared_key_dim, shared_value_dim: As in `convert_model`.
        statistics: Optional `{site path: AttentionStatistics}`.
        target_error, value_target_error, seed, tol, max_iter: As in
            `convert_model`.
        progress: Whether to show a progress bar over layers.

    Returns:
        `{site path: AttentionConversion}`, in site order.
    """
    statistics = statistics or {}

    def decompose(site):
        return decompose_attention(
            site.layer,
            _for_site(shared_key_dim, site.path, "shared_key_dim"),
            shared_value_dim=_for_site(
                shared_value_dim, site.path, "shared_value_dim"
            ),
            calibration=statistics.get(site.path),
            target_error=target_error,
            value_target_error=value_target_error,
            seed=seed,
            tol=tol,
            max_iter=max_iter,
        )

    conversions = {}
    with _side_by_side(decompose, sites) as decomposed:
        for site in progress_bar(sites, "Converting attention", progress):
            conversions[site.path] = build_conversion(
                site.layer, decomposed[site.path].result()
            )
    return conversions


def _available_cores():
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@contextlib.contextmanager
def _side_by_side(decompose, sites):
    """Runs `decompose(site)` for every site, one site per core.

    Yields `{site path: future}`. The decompositions are independent NumPy
    work that releases the GIL in BLAS, so threads give one layer to each
    core; BLAS itself then runs single-threaded in each (threadpoolctl):
    several multi-threaded BLAS calls at once oversubscribe the cores, and
    OpenBLAS's waiting threads then spin and can slow it down many times
    over on a busy machine. Without threadpoolctl, or with one core, the
    layers run one after the other with BLAS's own threads.
    """
    workers = min(len(sites), _available_cores())
    try:
        import threadpoolctl
    except ImportError:
        threadpoolctl = None
    if threadpoolctl is None or workers < 2:
        workers = 1
        limits = contextlib.nullcontext()
    else:
        limits = threadpoolctl.threadpool_limits(1, user_api="blas")
    with limits, futures.ThreadPoolExecutor(workers) as pool:
        submitted = {site.path: pool.submit(decompose, site) for site in sites}
        try:
            yield submitted
        finally:
            for future in submitted.values():
                future.cancel()


# (accepts(model) -> bool, assemble(model, sites, conversions)) pairs.
_ASSEMBLERS = []


def register_assembler(accepts, assemble_fn):
    """Teaches `assemble` to rebuild another kind of model.

    Args:
        accepts: `accepts(model)`: whether `assemble_fn` rebuilds `model`.
        assemble_fn: `assemble_fn(model, sites, conversions)` returns
            `(new model, {site path: AttentionConversion})`, each
            conversion's `layer` being the one placed in the new model.
    """
    _ASSEMBLERS.append((accepts, assemble_fn))


def assemble(model, sites, conversions):
    """A new model with the converted layers in place of the sites.

    Returns:
        `(new model, {site path: AttentionConversion})`, each conversion's
        `layer` being the one inside the new model.
    """
    for accepts, assemble_fn in _ASSEMBLERS:
        if accepts(model):
            return assemble_fn(model, sites, conversions)
    if sites_lib.is_plain_graph_model(model) and all(
        site.owner is None for site in sites
    ):
        replacements = {
            site.path: conversions[site.path].layer for site in sites
        }
        new_model = sites_lib.rebuild_graph_model(model, replacements)
        return new_model, conversions
    raise ValueError(
        f"Cannot rebuild a model of type {type(model).__name__}: "
        "convert_model supports KerasHub backbones and tasks and plain "
        "functional or sequential models whose attention layers are nodes "
        "of the graph. For other models, convert layers one by one with "
        "keras_collab.convert_attention."
    )


def convert_model(
    model,
    shared_key_dim=None,
    *,
    shared_value_dim=None,
    calibration_data=None,
    target_error=None,
    value_target_error=None,
    refine_steps=0,
    refine_learning_rate=1e-3,
    refine_objective="attention",
    distill_steps=0,
    distill_learning_rate=1e-4,
    seed=0,
    tol=1e-6,
    max_iter=300,
    progress=False,
):
    """Converts every multi-head attention layer of a model.

    Args:
        model: A built Keras model: a KerasHub backbone or task, a functional
            or sequential model. It is not modified.
        shared_key_dim: D̃ for every layer: `None` (full size, exact), an
            integer, a fraction of `num_heads * key_dim`, or a mapping from
            site path (see `find_sites`) to one of those.
        shared_value_dim: D̃_v of shared values for every layer: `None`
            keeps per-head values (exact copies); an integer, a fraction of
            `num_heads * value_dim`, or a mapping like `shared_key_dim`
            decomposes the value/output side too.
        calibration_data: Optional batch, or list of batches, that `model`
            accepts. With it the decomposition is activation-aware: it
            minimises the error of each layer's logits on this data.
        target_error: Optional: pick per layer the smallest D̃ whose relative
            (activation-weighted) error is at most this.
        value_target_error: The same for D̃_v (shared values).
        refine_steps: Gradient steps per layer that fit the converted
            layer's attention to the original's on calibration inputs, layer
            after layer (needs `calibration_data`).
        refine_learning_rate: Adam learning rate of the refinement.
        refine_objective: `"attention"` (KL divergence of the attention
            probabilities) or `"output"` (squared error of the layer
            outputs); see `keras_collab.conversion.refinement.refine_layer`.
        distill_steps: Adam steps of a final distillation of the whole
            converted model toward the original on the calibration data
            (`keras_collab.distill`: only the collaborative query/key side
            trains; needs `calibration_data`).
        distill_learning_rate: Its learning rate.
        seed: Seed of decomposition and refinement (results are
            deterministic for a given backend).
        tol: Relative improvement under which the decomposition stops.
        max_iter: Maximum decomposition iterations per layer.
        progress: Whether to show a progress bar over layers.

    Returns:
        A `ModelConversion`.

    Example:

    ```python
    backbone = keras_hub.models.BertBackbone.from_preset("bert_base_en")
    result = keras_collab.convert_model(
        backbone, shared_key_dim=0.25, calibration_data=batches
    )
    result.model.save_to_preset("bert_base_collab")
    ```
    """
    clock = StageClock()
    sites = find_sites(model)
    if not sites:
        raise ValueError(
            f"Model '{model.name}' has no keras.layers.MultiHeadAttention "
            "layers to convert."
        )
    if refine_steps and calibration_data is None:
        raise ValueError("`refine_steps` needs `calibration_data`.")
    if distill_steps and calibration_data is None:
        raise ValueError("`distill_steps` needs `calibration_data`.")
    statistics = None
    if calibration_data is not None:
        with clock.stage("calibration"):
            statistics = collect_statistics(model, sites, calibration_data)
    with clock.stage("decomposition"):
        conversions = convert_sites(
            sites,
            shared_key_dim,
            shared_value_dim=shared_value_dim,
            statistics=statistics,
            target_error=target_error,
            value_target_error=value_target_error,
            seed=seed,
            tol=tol,
            max_iter=max_iter,
            progress=progress,
        )
    with clock.stage("assembly"):
        converted, placed = assemble(model, sites, conversions)
    refinement = {}
    if refine_steps:
        with clock.stage("refinement"):
            refinement = refine_layers(
                model,
                converted,
                [site.path for site in sites],
                calibration_data,
                steps=refine_steps,
                learning_rate=refine_learning_rate,
                objective=refine_objective,
                seed=seed,
                progress=progress,
            )
    distillation = {}
    if distill_steps:
        with clock.stage("distillation"):
            distillation = distill(
                model,
                converted,
                calibration_data,
                steps=distill_steps,
                learning_rate=distill_learning_rate,
                seed=seed,
                progress=progress,
                layers=[conversion.layer for conversion in placed.values()],
            )
    stage_seconds = clock.seconds()
    return ModelConversion(
        model=converted,
        layers=placed,
        seconds=stage_seconds["total"],
        refinement=refinement,
        distillation=distillation,
        stage_seconds=stage_seconds,
    )
