"""calibration(): do the intervals of the sampled populations cover held-out real populations (donors, batches)?"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from anndata import AnnData

from .._validation import check_obs_column
from ._conformal import ConformalIntervals, check_conformal
from ._populations import (
    DEFAULT_PSEUDOCOUNT,
    central_interval,
    check_levels,
    check_pseudocount,
    condition_keys,
    gene_columns,
    level_tag,
    lfc,
    matrix,
    population_codes,
    populations_of,
    select,
)

#: Default nominal levels of :func:`calibration`.
CALIBRATION_LEVELS: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95)


@dataclass(frozen=True)
class CalibrationResult:
    """Output of :func:`calibration`.

    Attributes
    ----------
    coverage
        One row per level: ``level``, ``nominal``, ``empirical`` (share of (group, gene) real log fold changes
        inside the predicted central interval), ``n`` (pairs), ``se`` (binomial standard error, treating pairs
        as independent, which they are not quite: genes of a group share the group), ``max_attainable``
        (``(K - 1) / (K + 1)`` for the smallest ``K``: the coverage of ``[min, max]``; 1 for conformal
        intervals), ``intervals`` (``"sampled"``: central intervals of the samples; ``"conformal"``: the
        ``conformal`` argument's).
    rank_histogram
        ``n_populations``, ``rank`` (0 .. K: how many of the ``K`` sampled log fold changes lie below the real
        one, ties split at random), ``count``, ``frequency`` and ``expected`` (``1 / (K + 1)``). Flat =
        calibrated; U-shaped = intervals too narrow; hump-shaped = too wide; sloped = biased.
    per_gene
        One row per (condition, group, gene): ``perturbation``, ``context``, ``group``, ``gene``, ``real_lfc``,
        ``lfc_mean``, ``lfc_sd`` (over the sampled populations), ``lfc_lower_<L>``, ``lfc_upper_<L>``,
        ``inside_<L>``, ``rank``, ``n_populations`` and ``z = (real_lfc - lfc_mean) / lfc_sd``.
    groups
        One row per (condition, group): ``n_genes``, ``coverage_<L>``, ``bias`` (mean of
        ``real_lfc - lfc_mean``), ``rmse`` (of the same), ``mean_sd`` (mean ``lfc_sd``), ``z_mean`` and ``z_sd``
        (mean and standard deviation of ``z``; calibrated: about 0 and 1, ``z_sd`` a little above 1 for small
        ``K`` as ``lfc_sd`` is estimated from ``K`` draws; ``z_sd`` well above 1 = intervals too
        narrow, ``|z_mean|`` well above 0 = biased mean).
    """

    coverage: pd.DataFrame
    rank_histogram: pd.DataFrame
    per_gene: pd.DataFrame
    groups: pd.DataFrame


def _ranks(real: np.ndarray, samples: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rank of each ``real[g]`` among ``samples[:, g]``: ``#below + U{0..#equal}`` (ties split at random)."""
    below = (samples < real[None, :]).sum(0)
    equal = (samples == real[None, :]).sum(0)
    return below + rng.integers(0, equal + 1)


def _control_rows(control: AnnData, ctx_key: str | None, ctx, group_key: str | None, group) -> np.ndarray:
    rows = select(control, **({ctx_key: ctx} if ctx_key else {}), **({group_key: group} if group_key else {}))
    if len(rows) == 0:
        where = f"context {ctx!r}" + (f" and {group_key} {group!r}" if group_key else "")
        raise ValueError(f"control has no cell of {where}; pass matching control cells (or matched_control=False).")
    return rows


def calibration(
    pred: AnnData,
    real: AnnData,
    control: AnnData,
    *,
    group_key: str,
    perturbation_key: str | None = None,
    context_key: str | None = None,
    population_key: str = "population",
    levels: Sequence[float] = CALIBRATION_LEVELS,
    genes: Sequence[str] | None = None,
    pseudocount: float = DEFAULT_PSEUDOCOUNT,
    matched_control: bool | None = None,
    layer: str | None = None,
    conformal: ConformalIntervals | None = None,
    seed: int = 0,
) -> CalibrationResult:
    """Check the sampled populations' intervals against held-out real populations (donors, batches, replicates).

    Each group of ``real`` (a value of ``real.obs[group_key]`` within a (perturbation, context) condition, e.g.
    one donor) is one real population. Its pseudobulk log fold change per gene,
    ``log2((mean expm1(x) + pc) / (mean expm1(c) + pc))`` (the definition of
    :func:`~perturbdiff_scvi.tl.population_summary`), is compared with the ``K`` log fold changes of the sampled
    populations of the same condition:

    - **coverage**: the share of (group, gene) real log fold changes inside the central interval of the
      sampled ones (``(1 -/+ level) / 2`` quantiles, ``method="weibull"``) at each nominal level; a calibrated
      model covers about ``level`` (a real group is then one more exchangeable draw);
    - **rank histogram**: the rank of the real value among the ``K`` sampled ones, uniform on ``0 .. K`` when
      calibrated.

    Which predictions and controls are compared:

    - if ``pred`` also has the ``group_key`` column (e.g. ``batch_key="donor"`` and one prediction per donor,
      each conditioned on that donor's control cells), group ``d`` is compared with the populations predicted
      for ``d`` only; otherwise every group of a condition is compared with all its populations;
    - ``matched_control`` (default: when ``control`` has the ``group_key`` column): the log fold changes of
      group ``d``, real and predicted, are taken against ``d``'s own control cells of the context, so that a
      donor's baseline does not count as a response; ``False``: against all control cells of the context.

    Parameters
    ----------
    pred
        Predicted cells with ``K >= 2`` populations per condition (``predict_population(..., n_populations=K)``).
    real
        Real held-out perturbed cells, with ``group_key``, ``perturbation_key`` (and ``context_key``) columns.
    control
        Real control cells holding every gene of ``pred``.
    group_key
        Obs column of ``real`` naming its populations (donor, batch, replicate).
    perturbation_key, context_key
        Obs columns naming the perturbation and the context; ``None``: as recorded in ``pred.uns["perturbdiff"]``
        (see :func:`~perturbdiff_scvi.tl.population_summary`).
    population_key
        Obs column of ``pred`` telling its populations apart.
    levels
        Nominal levels of the central intervals.
    genes
        Genes to check; ``None`` = all genes of ``pred``.
    pseudocount
        Pseudocount of the log fold change (normalised-expression units).
    matched_control
        Take each group's log fold changes against its own control cells (see above). ``None`` = when
        ``control.obs`` has ``group_key``.
    layer
        Layer to read instead of ``X`` (in every AnnData).
    conformal
        Check the conformal intervals ``lfc_mean -/+ q_L (lfc_sd + offset)`` of
        :func:`~perturbdiff_scvi.tl.conformal_intervals` (learnt on *other* held-out populations) instead of the
        central intervals of the samples; ``coverage["intervals"]`` says which were checked. The ranks and ``z``
        stay those of the samples.
    seed
        Seed of the random split of ties in the ranks.

    Returns
    -------
    CalibrationResult
        ``coverage``, ``rank_histogram``, ``per_gene`` and ``groups`` tables (see :class:`CalibrationResult`).

    Examples
    --------
    >>> pred = model.predict_population("stimulated", contexts="CD4T", batches=["101", "107"], n_populations=20)
    >>> result = pdiff.tl.calibration(pred, real, control, group_key="donor", perturbation_key="condition",
    ...                               context_key="cell_type")
    >>> result.coverage[["nominal", "empirical"]]
    """
    levels = check_levels(levels)
    pseudocount = check_pseudocount(pseudocount)
    check_conformal(conformal)
    perturbation_key, context_key = condition_keys(pred, perturbation_key, context_key)
    if group_key is None:
        raise ValueError("group_key is required: the obs column of real naming its populations (e.g. 'donor').")
    for arg, key in (("group_key", group_key), ("perturbation_key", perturbation_key), ("context_key", context_key)):
        check_obs_column(real.obs, key, arg, where="real.obs")
    pops = population_codes(pred, population_key)
    names, cols = gene_columns(pred, {"real": real, "control": control}, genes)
    if matched_control is None:
        matched_control = group_key in control.obs.columns
    elif matched_control and group_key not in control.obs.columns:
        raise ValueError(f"matched_control=True needs a {group_key!r} column in control.obs.")
    ctrl_group_key = group_key if matched_control else None
    ctrl_ctx_key = context_key if context_key is not None and context_key in control.obs.columns else None
    pred_group_key = group_key if group_key in pred.obs.columns else None
    rng = np.random.default_rng(seed)
    keys = [perturbation_key] + ([context_key] if context_key is not None else [])
    conditions = real.obs[[*keys, group_key]].astype(str).drop_duplicates().itertuples(index=False, name=None)
    records = []
    for cond in conditions:
        pert, ctx, group = cond[0], (cond[1] if context_key is not None else None), cond[-1]
        where = {perturbation_key: pert, **({context_key: ctx} if context_key else {})}
        p_rows = select(pred, **where, **({pred_group_key: group} if pred_group_key else {}))
        if len(p_rows) == 0:
            label = (pert, ctx) + ((group,) if pred_group_key else ())
            raise ValueError(f"pred has no cell of the real condition {label}; predict every held-out condition.")
        populations = populations_of(pred, p_rows, pops, cols["pred"], layer)
        k = len(populations)
        if k < 2:
            raise ValueError(
                f"pred has a single population for {(pert, ctx)}: intervals need n_populations >= 2 (e.g. 20)."
            )
        c_rows = _control_rows(control, ctrl_ctx_key, ctx, ctrl_group_key, group)
        ctrl_linear = np.expm1(matrix(control, c_rows, cols["control"], layer, "control")).mean(0)
        real_x = matrix(real, select(real, **where, **{group_key: group}), cols["real"], layer, "real")
        real_lfc = lfc(real_x, ctrl_linear, pseudocount)
        samples = np.stack([lfc(x, ctrl_linear, pseudocount) for x in populations])  # (K, G)
        mean, sd = samples.mean(0), samples.std(0, ddof=1)
        frame = {
            "perturbation": pert,
            "context": ctx,
            "group": group,
            "gene": names.to_numpy(),
            "n_populations": k,
            "real_lfc": real_lfc,
            "lfc_mean": mean,
            "lfc_sd": sd,
        }
        for level in levels:
            lo, hi = central_interval(samples, level) if conformal is None else conformal.interval(mean, sd, level)
            tag = level_tag(level)
            frame[f"lfc_lower_{tag}"], frame[f"lfc_upper_{tag}"] = lo, hi
            frame[f"inside_{tag}"] = (real_lfc >= lo) & (real_lfc <= hi)
        frame["rank"] = _ranks(real_lfc, samples, rng)
        with np.errstate(divide="ignore", invalid="ignore"):
            frame["z"] = (real_lfc - mean) / sd
        records.append(pd.DataFrame(frame))
    per_gene = pd.concat(records, ignore_index=True)
    return CalibrationResult(
        coverage=_coverage(per_gene, levels, conformal=conformal is not None),
        rank_histogram=_rank_histogram(per_gene),
        per_gene=per_gene,
        groups=_groups(per_gene, levels),
    )


def _coverage(per_gene: pd.DataFrame, levels: tuple[float, ...], *, conformal: bool) -> pd.DataFrame:
    k_min = int(per_gene["n_populations"].min())
    attainable = 1.0 if conformal else (k_min - 1) / (k_min + 1)
    out = []
    for level in levels:
        inside = per_gene[f"inside_{level_tag(level)}"].to_numpy()
        p = float(inside.mean())
        se = float(np.sqrt(p * (1 - p) / inside.size))
        out.append((level_tag(level), level, p, inside.size, se, attainable, "conformal" if conformal else "sampled"))
    too_high = [lv for lv in levels if lv > attainable + 1e-12]
    if too_high:
        warnings.warn(
            f"levels {too_high} exceed (K - 1) / (K + 1) = {attainable:.3f} for K = {k_min} populations: those "
            "intervals are [min, max] and cannot reach their nominal coverage. Sample more populations.",
            UserWarning,
            stacklevel=3,
        )
    columns = ["level", "nominal", "empirical", "n", "se", "max_attainable", "intervals"]
    return pd.DataFrame(out, columns=columns)


def _rank_histogram(per_gene: pd.DataFrame) -> pd.DataFrame:
    out = []
    for k, part in per_gene.groupby("n_populations"):
        counts = np.bincount(part["rank"].to_numpy(), minlength=int(k) + 1)
        for rank, count in enumerate(counts):
            out.append((int(k), rank, int(count), count / counts.sum(), 1 / (int(k) + 1)))
    return pd.DataFrame(out, columns=["n_populations", "rank", "count", "frequency", "expected"])


def _groups(per_gene: pd.DataFrame, levels: tuple[float, ...]) -> pd.DataFrame:
    out = []
    for (pert, ctx, group), part in per_gene.groupby(["perturbation", "context", "group"], sort=False, dropna=False):
        err = part["real_lfc"] - part["lfc_mean"]
        z = part["z"][np.isfinite(part["z"])]
        row = {"perturbation": pert, "context": ctx, "group": group, "n_genes": len(part)}
        row.update({f"coverage_{level_tag(lv)}": float(part[f"inside_{level_tag(lv)}"].mean()) for lv in levels})
        row.update(
            {
                "bias": float(err.mean()),
                "rmse": float(np.sqrt((err**2).mean())),
                "mean_sd": float(part["lfc_sd"].mean()),
                "z_mean": float(z.mean()) if len(z) else np.nan,
                "z_sd": float(z.std(ddof=1)) if len(z) > 1 else np.nan,
            }
        )
        out.append(row)
    return pd.DataFrame(out)
