"""Reference baselines for perturbation-response prediction (numpy / scipy / pandas / anndata only).

Each baseline takes the **training** AnnData and one (perturbation, context) to predict, and returns an
AnnData in the format of :meth:`perturbdiff_scvi.PerturbDiff.predict_population`: dense float32 ``X`` in the
training space, the training ``var_names``, the user's perturbation / context / batch columns as
categoricals plus an int64 ``population`` column, ``obs_names`` ``"baseline_<i>"`` and the settings in
``uns["baseline"]``. Cells of the predicted combination are never used, even when present in ``adata``.

- :func:`control_baseline`: control cells of the context, unchanged.
- :func:`cell_mean_baseline`: every cell = mean of all perturbed training cells (Virtual Cell Challenge).
- :func:`additive_shift_baseline`: control cells + the perturbation's mean shift in the other contexts.
- :func:`pooled_other_contexts_baseline`: cells of the perturbation drawn from the other contexts.
- :func:`linear_baseline`: control cells + the perturbation effect of an additive ridge model of pseudobulks.
- :func:`half_vs_half_ceiling`: half of the real held-out cells against the other half (noise ceiling).

Importing this module does not import scvi-tools or torch.
"""

from ._baselines import (
    additive_shift_baseline,
    cell_mean_baseline,
    control_baseline,
    half_vs_half_ceiling,
    linear_baseline,
    pooled_other_contexts_baseline,
)

__all__ = [
    "additive_shift_baseline",
    "cell_mean_baseline",
    "control_baseline",
    "half_vs_half_ceiling",
    "linear_baseline",
    "pooled_other_contexts_baseline",
]
