"""``guidance_scale="auto"``: per condition, the guidance whose response has the size measured in similar contexts.

Not in the released method. On held-out Kang cell types the E-distance is lowest where the predicted response has
its real size (``|mean(pred) - mean(ctrl)|`` over the genes), and the guidance that gets there differs by type:
without guidance a held-out monocyte type gets 0.6 of its real response, CD8T all of it
(``benchmarks/results/peers_guidance``). ``"auto"`` therefore estimates the size of the response from the training
cells, as the mean over the contexts in which the perturbation was measured of its response size there, weighted by
how close each context's control cells are to this context's (``exp(-(d / d_min)^2)``, ``d`` the distance between
control means, ``d_min`` the smallest non-zero one), and picks from :data:`GUIDANCE_GRID` the scale whose probe
population (population 0 of each condition) comes closest to it. A condition without such an estimate (a
perturbation measured in no context, e.g. an unseen combination) gets the default scale.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from .._context_kernel import kernel_weights
from ..diffusion import DEFAULT_GUIDANCE_SCALE
from ._ranges import _chunks

#: The guidance scales ``"auto"`` chooses from.
GUIDANCE_GRID: tuple[float, ...] = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 1.0, 1.25, 1.5)


def group_means(registry) -> tuple[dict[tuple[int, int], np.ndarray], dict[tuple[int, int], int]]:
    """Mean expression and cell count of every (perturbation code, context code) of the training cells, batches
    pooled: one pass over the registered matrix in row blocks."""
    pert, ctx, _ = registry.codes
    keys, inverse = np.unique(np.stack([pert, ctx], axis=1), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    sums = np.zeros((len(keys), registry.matrix.shape[1]))
    start = 0
    for block in _chunks(registry.matrix):
        np.add.at(sums, inverse[start : start + len(block)], block)
        start += len(block)
    counts = np.bincount(inverse, minlength=len(keys))
    means = {(int(p), int(c)): sums[i] / counts[i] for i, (p, c) in enumerate(keys)}
    return means, {(int(p), int(c)): int(counts[i]) for i, (p, c) in enumerate(keys)}


def response_size_target(means: dict, control_code: int, code: int, ctx: int) -> float | None:
    """The estimated response size of perturbation ``code`` in context ``ctx`` (see the module docstring), or
    ``None`` when the perturbation was measured in no context with control cells (``code=-1``: never registered).

    Examples
    --------
    >>> means = {(0, 0): np.zeros(2), (1, 0): np.array([3.0, 4.0]), (0, 1): np.ones(2)}
    >>> response_size_target(means, control_code=0, code=1, ctx=1)  # measured in context 0 only: |(3, 4)| = 5
    5.0
    """
    if code < 0 or (control_code, ctx) not in means:
        return None
    here = means[(control_code, ctx)]
    sizes, dists = [], []
    for (p, c), mean in means.items():
        if p != code or (control_code, c) not in means:
            continue
        ctrl = means[(control_code, c)]
        sizes.append(np.linalg.norm(mean - ctrl))
        dists.append(np.linalg.norm(ctrl - here))
    if not sizes:
        return None
    weights = kernel_weights(np.asarray(dists))
    return float(np.sum(weights * np.asarray(sizes)) / np.sum(weights))


def reference_shifts(registry, n_perturbations: int, n_contexts: int) -> np.ndarray:
    """The reference responses of ``DiffusionOptions(reference_shift=True)``, ``(n_perturbations, n_contexts, G)``.

    Entry ``(p, c)`` is the mean response ``mean(p, c') - mean(control, c')`` of perturbation ``p`` over the training
    contexts ``c' != c`` where it was measured (with control cells), weighted by :func:`kernel_weights` of the
    distances between their control means and ``c``'s; 0 for the control, for a context without control cells and
    for a perturbation measured in no other context.

    Examples
    --------
    >>> ref = reference_shifts(model.registry_view, 2, 3)  # doctest: +SKIP
    >>> ref[1, 2]  # doctest: +SKIP
    >>> # the response of perturbation 1 in contexts 0 and 1, weighted by their closeness to context 2
    """
    means, _ = group_means(registry)
    control = registry.control_code
    out = np.zeros((n_perturbations, n_contexts, registry.matrix.shape[1]), dtype=np.float32)
    shifts = {(p, c): m - means[(control, c)] for (p, c), m in means.items() if p != control and (control, c) in means}
    for c in range(n_contexts):
        if (control, c) not in means:
            continue
        here = means[(control, c)]
        for p in {p for p, _ in shifts}:
            others = [c2 for (p2, c2) in shifts if p2 == p and c2 != c]
            if not others:
                continue
            weights = kernel_weights(np.array([np.linalg.norm(means[(control, c2)] - here) for c2 in others]))
            out[p, c] = np.tensordot(weights / weights.sum(), np.stack([shifts[(p, c2)] for c2 in others]), axes=1)
    return out


def choose_guidance(
    sample_jobs, module, registry, jobs, conditions, source, sampling, x0_max, seed: int
) -> tuple[list[float], list[float | None]]:
    """Per condition: the scale of :data:`GUIDANCE_GRID` whose probe response size is closest to the target, and
    the target (``None``: no estimate; the default scale is used). ``sample_jobs`` is ``_predict.sample_jobs``;
    the probes use a generator of their own (seeded from ``seed``), so they do not move the final draws."""
    means, _ = group_means(registry)
    targets = [response_size_target(means, registry.control_code, cond.code, cond.ctx) for cond in conditions]
    chosen = [float(DEFAULT_GUIDANCE_SCALE)] * len(conditions)
    probe = [i for i, job in enumerate(jobs) if job.population == 0 and targets[job.condition] is not None]
    if not probe:
        return chosen, targets
    probe_jobs = [jobs[i] for i in probe]
    pools = {}
    for job in probe_jobs:
        cond = conditions[job.condition]
        if (cond.ctx, cond.batch) not in pools:
            pool = source.pool(cond.ctx, cond.batch)
            pools[(cond.ctx, cond.batch)] = source.rows(cond.ctx, cond.batch, np.arange(len(pool))).mean(0)
    best = {ci: (np.inf, chosen[ci]) for ci in {job.condition for job in probe_jobs}}
    for w in GUIDANCE_GRID:
        gen = torch.Generator().manual_seed(seed)
        cells = sample_jobs(module, probe_jobs, conditions, source, replace(sampling, guidance_scale=w), gen, x0_max)
        for ci in best:
            cond = conditions[ci]
            generated = np.concatenate([x for job, x in zip(probe_jobs, cells, strict=True) if job.condition == ci])
            size = np.linalg.norm(generated[: cond.n].mean(0) - pools[(cond.ctx, cond.batch)])
            gap = abs(size - targets[ci])
            if gap < best[ci][0]:
                best[ci] = (gap, w)
    for ci, (_, w) in best.items():
        chosen[ci] = float(w)
    return chosen, targets
