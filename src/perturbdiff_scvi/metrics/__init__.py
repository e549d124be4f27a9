"""Evaluation metrics (numpy, scipy, scikit-learn, scanpy).

Definitions follow the design note ``metrics.md`` (cell-eval / pdex for the VCC metrics, pertpy for the
E-distance, CellFlow for the RBF MMD, scGen / CPA for the R² of means). Modules:

- ``_distribution``: :func:`energy_distance` (alias :func:`e_distance`), :func:`mmd_rbf`, :func:`fit_pca`;
- ``_expression``: pseudobulk errors, :func:`pearson_delta`, :func:`r2_mean`, :func:`discrimination_score`,
  :func:`baseline_normalized_score`;
- ``_de_agreement``: :func:`de_metrics` (cell-eval's DE agreement between two DE tables);
- ``_de``: :func:`differential_expression` (pdex's DE table) and :func:`top_de_genes` (scanpy Wilcoxon);
- ``_sparsity``: :func:`realistic_zero_threshold`, :func:`zero_small_values`;
- ``_realism``: whether a predicted population looks like real cells: :func:`c2st_auroc` /
  :func:`c2st_ceiling` (classifier two-sample test), :func:`knn_mixing` / :func:`knn_mixing_ceiling`,
  :func:`spread_ratio`, :func:`detected_genes`, :func:`out_of_range_fraction`, :func:`max_over_training`.
"""

from ._de import (
    DE_COLUMNS,
    benjamini_hochberg,
    differential_expression,
    log2_fold_change,
    pseudobulk_geometric,
    top_de_genes,
)
from ._de_agreement import de_metrics
from ._distribution import DEFAULT_MMD_GAMMAS, PCAProjection, e_distance, energy_distance, fit_pca, mmd_rbf
from ._expression import (
    baseline_normalized_score,
    discrimination_score,
    mae,
    mse,
    pearson_delta,
    r2_mean,
)
from ._realism import (
    c2st_auroc,
    c2st_ceiling,
    detected_genes,
    knn_mixing,
    knn_mixing_ceiling,
    max_over_training,
    out_of_range_fraction,
    spread_ratio,
)
from ._sparsity import realistic_zero_threshold, zero_small_values

__all__ = [
    "DEFAULT_MMD_GAMMAS",
    "DE_COLUMNS",
    "PCAProjection",
    "baseline_normalized_score",
    "benjamini_hochberg",
    "c2st_auroc",
    "c2st_ceiling",
    "de_metrics",
    "detected_genes",
    "differential_expression",
    "discrimination_score",
    "e_distance",
    "energy_distance",
    "fit_pca",
    "knn_mixing",
    "knn_mixing_ceiling",
    "log2_fold_change",
    "mae",
    "max_over_training",
    "mmd_rbf",
    "mse",
    "out_of_range_fraction",
    "pearson_delta",
    "pseudobulk_geometric",
    "r2_mean",
    "realistic_zero_threshold",
    "spread_ratio",
    "top_de_genes",
    "zero_small_values",
]
