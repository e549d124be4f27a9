"""conformal_intervals(): widen the sampled log-fold-change intervals by the model's own error on held-out data."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

#: ``offset="auto"``: this many times the median sampled sd of the calibration pairs (``benchmarks/README.md``,
#: "Conformal intervals": at 80 %, 1x left the 70-90 % band on two of four (task, direction) pairs, 0.69 and
#: 0.92; 4x kept all four inside).
AUTO_OFFSET_FACTOR = 4.0


@dataclass(frozen=True)
class ConformalIntervals:
    """Split-conformal log-fold-change intervals, learnt from held-out real populations.

    The sampled populations of one condition spread by their population-to-population variability only; they
    carry no term for the model's own (epistemic) error, which on held-out contexts is several times larger
    (``benchmarks/README.md``, "Calibration"). This object rescales the intervals by that error as measured on
    real populations the model did not see: with ``m`` and ``s`` the mean and standard deviation of a gene's
    ``K`` sampled log fold changes, the interval at level ``L`` is

    ``m -/+ q_L (s + offset)``,

    where ``q_L`` is the ``ceil((n + 1) L)``-th smallest of the ``n`` calibration scores
    ``|real - m| / (s + offset)`` (split conformal prediction, with the sampled spread as the local scale and
    ``offset`` keeping genes whose sampled spread is near zero from getting zero width, and damping how much the
    sampled spread, which says little about the model's error, sets the width).

    If the target (condition, group, gene) triples are exchangeable with the calibration ones, a target interval
    covers its real value with probability at least ``L`` (and below ``L + 1 / (n + 1)``). Genes of one group
    share the group, so the honest unit is the group: with few calibration groups (contexts, donors), the
    coverage on new groups varies around ``L`` by how much the groups differ. Calibrate on contexts that
    resemble the targets.

    Attributes
    ----------
    scores
        Sorted calibration scores ``|real - m| / (s + offset)``, one per (condition, group, gene).
    offset
        The constant added to the sampled standard deviation.
    n_groups
        Number of (perturbation, context, group) real populations the scores come from.
    """

    scores: np.ndarray
    offset: float
    n_groups: int

    def quantile(self, level: float) -> float:
        """The multiplier ``q_L``: the ``ceil((n + 1) level)``-th smallest score (``inf`` if that exceeds ``n``)."""
        n = len(self.scores)
        rank = math.ceil((n + 1) * float(level))
        return float(self.scores[rank - 1]) if rank <= n else math.inf

    def interval(self, mean: np.ndarray, sd: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bounds ``mean -/+ q_L (sd + offset)`` at ``level``."""
        mean = np.asarray(mean, dtype=float)
        half = self.quantile(level) * (np.asarray(sd, dtype=float) + self.offset)
        return mean - half, mean + half


def conformal_intervals(calibration, *, offset: float | str = "auto") -> ConformalIntervals:
    """Learn conformal log-fold-change intervals from a :func:`~perturbdiff_scvi.tl.calibration` on held-out data.

    How to use it: hold some *measured* conditions out of training as a calibration split (for instance the
    perturbed cells of one or two contexts, or a model trained without them), predict them with
    ``n_populations=K``, run :func:`~perturbdiff_scvi.tl.calibration` against their real cells, and pass the
    result here. The returned :class:`ConformalIntervals` then widens the intervals of any other prediction of
    the same kind of model: ``population_summary(..., conformal=ci)`` and ``calibration(..., conformal=ci)``.
    Never calibrate on the conditions you then check: the guarantee needs calibration and targets apart.

    Parameters
    ----------
    calibration
        A :class:`~perturbdiff_scvi.tl.CalibrationResult` of held-out real populations (its ``per_gene`` table
        with ``real_lfc``, ``lfc_mean``, ``lfc_sd``).
    offset
        Added to the sampled sd before scaling (log2 units): a number ``>= 0``, or ``"auto"`` (default),
        ``AUTO_OFFSET_FACTOR`` (4) times the median sampled sd of the calibration pairs. ``0`` gives the plain
        normalised score ``|z|``, whose width follows the sampled spread; a large offset gives about one width
        for every gene. On held-out Kang cell types and a held-out donor (two directions each, three seeds),
        ``|z|`` and 1x the median missed the 70-90 % band at 80 % on some tasks; 4x and larger stayed inside on
        all (``benchmarks/README.md``).

    Returns
    -------
    ConformalIntervals

    Examples
    --------
    >>> cal = pdiff.tl.calibration(pred_cal, real_cal, control_cal, group_key="donor")  # held-out contexts
    >>> ci = pdiff.tl.conformal_intervals(cal)
    >>> ci.quantile(0.8)
    >>> summary = pdiff.tl.population_summary(pred, control, conformal=ci)  # intervals for the targets
    """
    per_gene = getattr(calibration, "per_gene", None)
    if not isinstance(per_gene, pd.DataFrame) or not {"real_lfc", "lfc_mean", "lfc_sd"} <= set(per_gene.columns):
        raise TypeError(
            "conformal_intervals needs the result of tl.calibration(...) on held-out real populations "
            f"(a CalibrationResult), got {type(calibration).__name__}."
        )
    real, mean, sd = (per_gene[c].to_numpy(dtype=float) for c in ("real_lfc", "lfc_mean", "lfc_sd"))
    keep = np.isfinite(real) & np.isfinite(mean) & np.isfinite(sd)
    if not keep.any():
        raise ValueError("the calibration result has no finite (real_lfc, lfc_mean, lfc_sd) row to learn from.")
    real, mean, sd = real[keep], mean[keep], sd[keep]
    if isinstance(offset, str):
        if offset != "auto":
            raise ValueError(f"offset must be a number >= 0 or 'auto', got {offset!r}.")
        offset = AUTO_OFFSET_FACTOR * float(np.median(sd))
    offset = float(offset)
    if not math.isfinite(offset) or offset < 0:
        raise ValueError(f"offset must be a finite number >= 0 or 'auto', got {offset!r}.")
    error, scale = np.abs(real - mean), sd + offset
    with np.errstate(divide="ignore", invalid="ignore"):
        scores = np.where(error == 0, 0.0, error / scale)  # 0 / 0 (exact and no spread) scores 0; x / 0 is inf
    group_cols = [c for c in ("perturbation", "context", "group") if c in per_gene.columns]
    n_groups = len(per_gene.loc[keep, group_cols].drop_duplicates()) if group_cols else 1
    return ConformalIntervals(scores=np.sort(scores), offset=offset, n_groups=int(n_groups))


def check_conformal(conformal) -> None:
    """Clear error for a ``conformal=`` argument that is not a :class:`ConformalIntervals` (or ``None``)."""
    if conformal is not None and not isinstance(conformal, ConformalIntervals):
        raise TypeError(
            "conformal must be the result of tl.conformal_intervals(tl.calibration(...)) on held-out populations "
            f"(a ConformalIntervals) or None, got {type(conformal).__name__}."
        )
