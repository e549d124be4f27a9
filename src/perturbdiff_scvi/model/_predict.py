"""Prediction: requested conditions, a plan of sets (``Job``), sampling, bias correction and the output AnnData."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from .._output import population_adata
from .._validation import as_list, find_category, is_finite_number, optional_positive_int, positive_int
from ..diffusion import DEFAULT_N_STEPS, RELEASED_START_TIME, SAMPLER_NAMES
from ..diffusion._sampling import sampler_choices
from ._controls import ControlSource
from ._counts import sample_counts
from ._options import OutputOptions, SamplerOptions
from ._ranges import x0_bound_value
from ._registry import Registry
from ._shift_pcs import check_pcs_anchor, check_shift_pcs, project_shifts
from ._transport import check_transport, quantile_transport

Sampler = Literal["ddim", "ddpm", "ddim_truncated"]
SAMPLERS: tuple[str, ...] = SAMPLER_NAMES


class Condition(NamedTuple):
    """One requested (perturbation, context, batch) population."""

    label: str  # perturbation label in the output
    pert: object  # what the module embeds: a registered code, or component codes (combinatorial)
    code: int  # registered perturbation code, -1 for a combination never registered
    ctx: int
    batch: int
    n: int  # cells per population


class Job(NamedTuple):
    """One set to generate: ``set_size`` cells of population ``population`` of ``conditions[condition]``."""

    condition: int  # index into the list of conditions
    population: int
    control_rows: np.ndarray  # positions in the condition's control pool, one per generated cell


@dataclass(frozen=True)
class SamplingOptions:
    """The checked sampling options of one ``predict_population`` call.

    ``n_steps`` is the number of reverse steps actually run (``start_time`` for ``"ddim_truncated"``);
    ``start_time`` is ``None`` for the strided samplers.
    """

    n_steps: int
    sampler: Sampler
    guidance_scale: float | Literal["auto"]
    batch_size: int
    use_ema: bool
    start_time: int | None = None
    progress_bar: bool = True

    @classmethod
    def checked(cls, *, n_steps, guidance_scale, options: SamplerOptions, n_timesteps: int) -> SamplingOptions:
        """The user's ``n_steps``, ``guidance_scale`` and :class:`SamplerOptions`, checked for ``n_timesteps``."""
        sampler, start_time, batch_size = options.sampler, options.start_time, options.batch_size
        use_ema, progress_bar = options.use_ema, options.progress_bar
        auto = isinstance(guidance_scale, str) and guidance_scale == "auto"
        if not auto and (not is_finite_number(guidance_scale) or guidance_scale < 0):
            raise ValueError(
                f"guidance_scale must be a number >= 0 (0 = no guidance) or 'auto'; got {guidance_scale!r}."
            )
        if not isinstance(sampler, str) or sampler not in SAMPLERS:
            raise ValueError(f"sampler must be {sampler_choices()}; got {sampler!r}.")
        if not isinstance(use_ema, bool | np.bool_):
            raise ValueError(f"use_ema must be True or False; got {use_ema!r}.")
        if not isinstance(progress_bar, bool | np.bool_):
            raise ValueError(f"progress_bar must be True or False; got {progress_bar!r}.")
        if sampler == "ddim_truncated":
            if n_steps is not None:
                raise ValueError(
                    f"n_steps={n_steps!r} does not apply to sampler='ddim_truncated', which runs start_time single "
                    "steps (t = start_time - 1, ..., 0); leave n_steps=None and set start_time= instead."
                )
            if start_time is None:
                start_time = min(RELEASED_START_TIME, n_timesteps)
            start_time = positive_int(start_time, "start_time", upper=n_timesteps, upper_name="n_timesteps")
            n_steps = start_time
        elif start_time is not None:
            raise ValueError(
                f"start_time={start_time!r} only applies to sampler='ddim_truncated'; sampler={sampler!r} strides "
                "n_steps steps over the whole schedule. Leave start_time=None (or use sampler='ddim_truncated')."
            )
        else:
            n_steps = DEFAULT_N_STEPS if n_steps is None else n_steps
        return cls(
            n_steps=positive_int(n_steps, "n_steps", upper=n_timesteps, upper_name="n_timesteps"),
            sampler=sampler,
            guidance_scale="auto" if auto else float(guidance_scale),
            batch_size=positive_int(batch_size, "batch_size"),
            use_ema=bool(use_ema),
            start_time=start_time,
            progress_bar=bool(progress_bar),
        )


def zero_threshold_value(value, auto_threshold: Callable[[], float]) -> float | None:
    """``zero_threshold`` as a float (``"auto"``: ``auto_threshold()``, from the training matrix) or ``None``."""
    if value is None:
        return None
    if isinstance(value, str) and value == "auto":
        return float(auto_threshold())
    if not is_finite_number(value):
        raise ValueError(f"zero_threshold must be None, 'auto' or a finite number >= 0; got {value!r}.")
    if value < 0:
        raise ValueError(f"zero_threshold must be >= 0 (values below it become 0); got {value!r}.")
    return float(value)


def seen_code(registry: Registry, what: str, value, codes: np.ndarray, obs_key: str | None) -> int:
    """Registered code of ``value`` (a ``"perturbation"``, ``"context"`` or ``"batch"``), which must have training
    cells."""
    code = find_category(registry.categories(what), value, what, str(obs_key))
    if not np.any(codes == code):
        raise ValueError(
            f"The {what} {value!r} has no cells in the training data (it is only an unused category "
            f"of {obs_key!r}), so the model never learned it."
        )
    return code


def resolve_perturbation(registry: Registry, value, codes: np.ndarray, obs_key: str) -> tuple[str, object, int]:
    """``(label, what the module embeds, registered code or -1)`` of a requested perturbation.

    Without ``combination_delimiter`` the module embeds the registered code; with it, the component
    codes, which also exist for a combination that was never registered.
    """
    vocab = registry.vocabulary
    labels = registry.categories("perturbation")
    if vocab is None:
        code = seen_code(registry, "perturbation", value, codes, obs_key)
        return labels[code], code, code
    mapping = [str(v) for v in labels]
    code = mapping.index(str(value)) if str(value) in mapping else -1
    if code >= 0 and np.any(codes == code):
        return labels[code], vocab.matrix[code][vocab.matrix[code] >= 0], code
    return str(value), vocab.codes(value, vocab.seen_components(codes), obs_key), code


def perturbation_tensor(perts: list) -> torch.Tensor:
    """``(B,)`` registered codes, or ``(B, K)`` component codes padded with -1."""
    if not isinstance(perts[0], np.ndarray):
        return torch.tensor(perts)
    out = torch.full((len(perts), max(1, max(len(p) for p in perts))), -1, dtype=torch.long)
    for i, p in enumerate(perts):
        out[i, : len(p)] = torch.from_numpy(p)
    return out


def plan(
    perts: list[tuple[str, object, int]],
    contexts: list[int],
    batches: list[int] | None,
    source: ControlSource,
    codes: tuple[np.ndarray, ...],
    *,
    n_cells: int | None,
    n_populations: int,
    set_size: int,
    rng: np.random.Generator,
) -> tuple[list[Condition], list[Job]]:
    """Every condition (perturbation x context x batch) and the sets that generate its populations."""
    pert_codes, ctx_codes, batch_codes = codes
    conditions: list[Condition] = []
    jobs: list[Job] = []
    for label, pert, code in perts:
        for c in contexts:
            for b in source.batches_for(c, batches):
                pool = source.pool(c, b)
                observed = int(np.sum((pert_codes == code) & (ctx_codes == c) & (batch_codes == b)))
                n = n_cells or observed or len(pool)
                conditions.append(Condition(label, pert, code, c, b, n))
                for pop in range(n_populations):
                    for _ in range(math.ceil(n / set_size)):
                        jobs.append(Job(len(conditions) - 1, pop, rng.choice(len(pool), set_size)))
    return conditions, jobs


def sample_jobs(
    module,
    jobs: list[Job],
    conditions: list[Condition],
    source: ControlSource,
    options: SamplingOptions,
    gen,
    x0_max: np.ndarray | float | None = None,
) -> list[np.ndarray]:
    """Generate every job's set, ``options.batch_size`` sets per forward pass: a list of ``(S, G)`` arrays.

    ``x0_max`` (expression units, see ``x0_bound``) caps each step's clean estimate; ``None`` = no cap.
    """
    extra = {}
    if options.start_time is not None:
        extra["start_time"] = options.start_time
    if x0_max is not None:
        extra["x0_max"] = torch.as_tensor(x0_max)
    from scvi.utils import track

    s = module.set_size
    out = []
    chunks = range(0, len(jobs), options.batch_size)
    for start in track(chunks, description="Sampling sets", disable=not options.progress_bar or len(chunks) < 2):
        chunk = jobs[start : start + options.batch_size]
        conds = [conditions[job.condition] for job in chunk]
        x_ctrl = np.stack(
            [source.rows(cond.ctx, cond.batch, job.control_rows) for cond, job in zip(conds, chunk, strict=True)]
        )
        x = module.sample(
            torch.from_numpy(x_ctrl),  # (B, S, G)
            perturbation_tensor([cond.pert for cond in conds]),
            torch.tensor([cond.ctx for cond in conds]),
            torch.tensor([cond.batch for cond in conds]),
            n_steps=options.n_steps,
            sampler=options.sampler,
            guidance_scale=options.guidance_scale,
            generator=gen,
            use_ema=options.use_ema,
            codes=torch.tensor([cond.code for cond in conds]),
            **extra,
        )
        out.extend(x.cpu().numpy().reshape(len(chunk), s, -1))
    return out


def sample_with_scales(module, jobs, conditions, source, options, gen, x0_max, scales: list[float] | None):
    """:func:`sample_jobs`, each condition at its own guidance scale (``scales``, one per condition; ``None``: all
    at ``options.guidance_scale``). Jobs of one scale are sampled together, the scales in order of first use."""
    if scales is None:
        return sample_jobs(module, jobs, conditions, source, options, gen, x0_max)
    out: list = [None] * len(jobs)
    for w in dict.fromkeys(scales[job.condition] for job in jobs):
        idx = [i for i, job in enumerate(jobs) if scales[job.condition] == w]
        group = replace(options, guidance_scale=w)
        for i, x in zip(idx, sample_jobs(module, [jobs[i] for i in idx], conditions, source, group, gen, x0_max),
                        strict=True):  # fmt: skip
            out[i] = x
    return out


def subtract_control_bias(
    jobs: list[Job], conditions: list[Condition], cells: list[np.ndarray], regenerated, source: ControlSource
) -> list[np.ndarray]:
    """Per condition: subtract the per-gene mean error of the regenerated controls against their control cells."""
    error_sum, n_sets = {}, {}
    for job, ctrl_generated in zip(jobs, regenerated, strict=True):
        cond = conditions[job.condition]
        error = ctrl_generated.mean(0) - source.rows(cond.ctx, cond.batch, job.control_rows).mean(0)
        error_sum[job.condition] = error_sum.get(job.condition, 0.0) + error
        n_sets[job.condition] = n_sets.get(job.condition, 0) + 1
    return [
        np.maximum(x - error_sum[job.condition] / n_sets[job.condition], 0.0).astype(x.dtype)
        for job, x in zip(jobs, cells, strict=True)
    ]


def jobs_by_population(jobs: list[Job]) -> dict[tuple[int, int], list[int]]:
    """The positions in ``jobs`` of each (condition, population), in job order."""
    by_pop: dict[tuple[int, int], list[int]] = {}
    for i, job in enumerate(jobs):
        by_pop.setdefault((job.condition, job.population), []).append(i)
    return by_pop


def transported(
    jobs: list[Job], conditions: list[Condition], cells: list[np.ndarray], source: ControlSource, rng
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per population: distinct control cells of its pool moved onto its generated cells' per-gene distributions.

    Only the population's first ``n`` cells (those :func:`assemble` keeps) are transported. The transport uses
    only the generated cells' per-gene distributions, not which control cell conditioned which generated cell,
    so the ``n`` control cells are drawn afresh from the pool *without* replacement (:func:`distinct_draw`): the
    conditioning sets are drawn with replacement, as in training, and a control cell that appears twice would
    give two near-identical output cells. Returns the cells and, per job, the pool positions of the control
    cell each output cell now comes from (for the library sizes of ``counts=True``).
    """
    out = list(cells)
    rows = [job.control_rows for job in jobs]
    for (ci, _), idx in jobs_by_population(jobs).items():
        cond = conditions[ci]
        n = cond.n  # the cells assemble keeps: the output has exactly their per-gene distributions
        picks = distinct_draw(n, len(source.pool(cond.ctx, cond.batch)), rng)
        generated = np.concatenate([cells[i] for i in idx])  # new arrays: the inputs are not written to
        pop_rows = np.concatenate([rows[i] for i in idx])
        controls = source.rows(cond.ctx, cond.batch, picks).astype(generated.dtype)
        generated[:n] = quantile_transport(generated[:n], controls, rng)
        pop_rows[:n] = picks
        for k, i in enumerate(idx):
            block = slice(k * len(cells[i]), (k + 1) * len(cells[i]))
            out[i], rows[i] = generated[block], pop_rows[block]
    return out, rows


def distinct_draw(n: int, pool_size: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` positions in a pool of ``pool_size``: a random permutation, repeated only once the pool is used up.

    Each position appears ``floor(n / pool_size)`` or ``ceil(n / pool_size)`` times.

    Examples
    --------
    >>> sorted(distinct_draw(3, 3, np.random.default_rng(0)).tolist())
    [0, 1, 2]
    """
    laps = [rng.permutation(pool_size) for _ in range(-(-n // pool_size))]
    return np.concatenate(laps)[:n]


def assemble(
    registry: Registry,
    conditions: list[Condition],
    jobs: list[Job],
    cells: list[np.ndarray],
    n_populations: int,
    uns: dict,
    layers: dict[str, list[np.ndarray]] | None = None,
) -> AnnData:
    """The output AnnData: each population cut to its condition's ``n`` cells, in condition order.

    ``layers`` maps a layer name to per-job arrays laid out like ``cells`` (e.g. sampled counts).
    """
    layers = layers or {}
    by_pop = jobs_by_population(jobs)
    blocks, meta = [], {"pert": [], "ctx": [], "batch": [], "population": []}
    layer_blocks = {name: [] for name in layers}
    for ci, cond in enumerate(conditions):
        for pop in range(n_populations):
            idx = by_pop[(ci, pop)]
            blocks.append(np.concatenate([cells[i] for i in idx])[: cond.n])
            for name, values in layers.items():
                layer_blocks[name].append(np.concatenate([values[i] for i in idx])[: cond.n])
            for name, value in {"pert": ci, "ctx": cond.ctx, "batch": cond.batch, "population": pop}.items():
                meta[name].extend([value] * cond.n)
    # Registered labels keep their registry order; combinations never registered follow as requested.
    order = sorted(range(len(conditions)), key=lambda i: (conditions[i].code < 0, conditions[i].code, i))
    labels = list(dict.fromkeys(conditions[i].label for i in order))  # keeps the user's value types
    pert_key, ctx_key, batch_key = registry.perturbation_key, registry.context_key, registry.batch_key
    obs = {pert_key: pd.Categorical.from_codes([labels.index(conditions[i].label) for i in meta["pert"]], labels)}
    for key, what, values in ((ctx_key, "context", meta["ctx"]), (batch_key, "batch", meta["batch"])):
        if key is not None:
            used = sorted(set(values))
            categories = registry.categories(what)[used]
            obs[key] = pd.Categorical.from_codes([used.index(c) for c in values], categories=categories)
    # the obs columns of the output, so that tl.population_summary / tl.calibration find them without arguments
    uns = {**uns, "perturbation_key": pert_key, "context_key": "None" if ctx_key is None else ctx_key}
    uns["batch_key"] = "None" if batch_key is None else batch_key
    out = population_adata(
        np.concatenate(blocks),
        obs=obs,
        population=np.asarray(meta["population"]),
        var_names=registry.var_names,
        name_prefix="perturbdiff",
        uns_key="perturbdiff",
        uns=uns,
    )
    for name, values in layer_blocks.items():
        out.layers[name] = np.concatenate(values)
    return out


def predict(
    module,
    registry: Registry,
    perturbations,
    contexts,
    batches,
    *,
    control_adata: AnnData | None,
    n_cells,
    n_populations,
    seed: int | None,
    sampling: SamplingOptions,
    output: OutputOptions,
) -> AnnData:
    """What ``PerturbDiff.predict_population`` does, with its arguments checked here (see its docstring).

    ``module`` is the trained :class:`~perturbdiff_scvi.module.PerturbDiffModule`; ``registry`` what setup
    registered (:class:`~perturbdiff_scvi.model.Registry`).
    """
    n_cells = optional_positive_int(n_cells, "n_cells")
    n_populations = positive_int(n_populations, "n_populations")
    zero_threshold = zero_threshold_value(output.zero_threshold, lambda: registry.zero_threshold)
    x0_max = x0_bound_value(output.x0_bound, lambda: registry.gene_max)
    perturbations = as_list(perturbations, "perturbations")
    pert_key, ctx_key, batch_key = registry.perturbation_key, registry.context_key, registry.batch_key
    codes = registry.codes
    pert_codes, ctx_codes, _ = codes
    perts = [resolve_perturbation(registry, v, pert_codes, pert_key) for v in perturbations]
    if contexts is None:
        c_ids = np.unique(ctx_codes).tolist()
    else:
        c_ids = [seen_code(registry, "context", v, ctx_codes, ctx_key) for v in as_list(contexts, "contexts")]
    if batches is not None and batch_key is None:
        raise ValueError(
            f"batches={batches!r} was given, but the model was set up without batch_key; pass batches=None "
            "(or set up with batch_key= and retrain)."
        )
    b_req = (
        None
        if batches is None
        else [
            find_category(registry.categories("batch"), v, "batch", str(batch_key)) for v in as_list(batches, "batches")
        ]
    )
    counts, counts_layer, bias_correction = output.counts, output.counts_layer, output.bias_correction
    if not isinstance(counts, bool | np.bool_):
        raise ValueError(f"counts must be True or False; got {counts!r}.")
    transport = check_transport(output.transport)
    shift_pcs = check_shift_pcs(output.shift_pcs, len(registry.var_names))
    pcs_anchor = check_pcs_anchor(output.pcs_anchor, shift_pcs)
    source = ControlSource(registry, control_adata)
    if counts:
        source.load_counts(counts_layer)  # a missing or non-count layer fails here, before any sampling
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    conditions, jobs = plan(
        perts,
        c_ids,
        b_req,
        source,
        codes,
        n_cells=n_cells,
        n_populations=n_populations,
        set_size=module.set_size,
        rng=rng,
    )
    scales = targets = None
    if sampling.guidance_scale == "auto":
        from ._auto_guidance import choose_guidance

        probe_seed = int(rng.integers(2**62))
        scales, targets = choose_guidance(
            sample_jobs, module, registry, jobs, conditions, source, sampling, x0_max, probe_seed
        )
    cells = sample_with_scales(module, jobs, conditions, source, sampling, gen, x0_max, scales)
    if bias_correction:
        label, pert, code = resolve_perturbation(registry, registry.control_value, pert_codes, pert_key)
        as_control = [cond._replace(label=label, pert=pert, code=code) for cond in conditions]
        regenerated = sample_with_scales(module, jobs, as_control, source, sampling, gen, x0_max, scales)
        cells = subtract_control_bias(jobs, conditions, cells, regenerated, source)
        if x0_max is not None:  # the correction may shift values up again: keep the documented bound
            cells = [np.minimum(x, x0_max).astype(x.dtype) for x in cells]
    if shift_pcs is not None:
        axes, center = registry.principal_axes(shift_pcs, return_mean=True)
        center = center if pcs_anchor == "training" else None
        cells = project_shifts(jobs_by_population(jobs), conditions, cells, source, axes, center)
        if x0_max is not None:  # the projection may shift values up: keep the documented bound
            cells = [np.minimum(x, x0_max).astype(x.dtype) for x in cells]
    if zero_threshold is not None:
        from ..metrics import zero_small_values

        cells = [zero_small_values(x, zero_threshold) for x in cells]
    if transport == "quantile":
        transport_rng = np.random.default_rng(rng.integers(2**62))
        cells, control_rows = transported(jobs, conditions, cells, source, transport_rng)
    else:
        control_rows = [job.control_rows for job in jobs]
    layers = None
    if counts:
        count_rng = np.random.default_rng(rng.integers(2**62))  # drawn last: counts=False draws stay the same
        pairs = [
            sample_counts(
                x, source.library_sizes(conditions[job.condition].ctx, conditions[job.condition].batch,
                                        rows), count_rng, registry.gene_max
            )
            for job, rows, x in zip(jobs, control_rows, cells, strict=True)
        ]  # fmt: skip
        layers = {"counts": [p[0] for p in pairs]}
        cells = [p[1] for p in pairs]
    x0_bound = output.x0_bound
    uns = {
        "perturbations": [str(v) for v in perturbations],
        "n_populations": n_populations,
        "guidance_scale": sampling.guidance_scale,
        "n_steps": sampling.n_steps,
        "sampler": sampling.sampler,
        "start_time": "None" if sampling.start_time is None else int(sampling.start_time),
        "seed": "None" if seed is None else int(seed),
        "set_size": int(module.set_size),
        "use_ema": sampling.use_ema,
        "controls": source.label,
        "bias_correction": bool(bias_correction),
        "zero_threshold": "None" if zero_threshold is None else float(zero_threshold),
        "x0_bound": "None" if x0_bound is None else (x0_bound if isinstance(x0_max, np.ndarray) else float(x0_max)),
        "counts": "None" if not counts else str(counts_layer),
        "transport": transport,
        "shift_pcs": "None" if shift_pcs is None else shift_pcs,
        "pcs_anchor": pcs_anchor,
    }
    if scales is not None:  # what "auto" chose, one entry per condition (in the order they were requested)
        uns["auto_guidance"] = {
            "perturbation": [str(c.label) for c in conditions],
            "context": [str(registry.categories("context")[c.ctx]) if registry.context_key else "None"
                        for c in conditions],
            "batch": [str(registry.categories("batch")[c.batch]) if registry.batch_key else "None" for c in conditions],
            "guidance_scale": np.asarray(scales, dtype=float),
            "target_shift": np.asarray([np.nan if t is None else t for t in targets], dtype=float),
        }  # fmt: skip
    return assemble(registry, conditions, jobs, cells, n_populations, uns, layers)
