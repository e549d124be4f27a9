"""Evaluation metrics (numpy/scipy/scanpy only).

Definitions follow the design note ``metrics.md`` (cell-eval / pdex for the VCC metrics, pertpy for the
E-distance, CellFlow for the RBF MMD, scGen / CPA for the R² of means).
"""

from ._basic import energy_distance, pearson_delta, top_de_genes
from ._de import DE_COLUMNS, benjamini_hochberg, differential_expression, log2_fold_change, pseudobulk_geometric
from ._distribution import DEFAULT_MMD_GAMMAS, PCAProjection, e_distance, fit_pca, mmd_rbf
from ._expression import baseline_normalized_score, de_metrics, discrimination_score, mae, mse, r2_mean
from ._sparsity import realistic_zero_threshold, zero_small_values

__all__ = [
    "DEFAULT_MMD_GAMMAS",
    "DE_COLUMNS",
    "PCAProjection",
    "baseline_normalized_score",
    "benjamini_hochberg",
    "de_metrics",
    "differential_expression",
    "discrimination_score",
    "e_distance",
    "energy_distance",
    "fit_pca",
    "log2_fold_change",
    "mae",
    "mmd_rbf",
    "mse",
    "pearson_delta",
    "pseudobulk_geometric",
    "r2_mean",
    "realistic_zero_threshold",
    "top_de_genes",
    "zero_small_values",
]
