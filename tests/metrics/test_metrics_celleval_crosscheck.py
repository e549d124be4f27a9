"""Cross-check of the hand-written cell-eval metrics and pdex DE against cell-eval 0.8 / pdex 0.3.

Both packages are in the ``test`` extra (not runtime dependencies). The tests skip only when a package is
not installed at all; an API that differs from the one used here (a missing function or attribute, a
changed signature, a missing result column or metric) fails, as do numeric disagreements.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from perturbdiff_scvi.metrics import de_metrics, differential_expression, discrimination_score, mae, mse, pearson_delta

CTRL = "ctrl"
PERTS = ["G0", "G1", "G2", "G3"]
#: cell-eval result columns compared with ours (all of cell-eval's "full" profile that we implement).
COMPARED = (
    "mae",
    "mse",
    "mae_delta",
    "mse_delta",
    "pearson_delta",
    "discrimination_score_l1",
    "discrimination_score_l2",
    "discrimination_score_cosine",
    "overlap_at_N",
    "overlap_at_50",
    "overlap_at_100",
    "overlap_at_200",
    "overlap_at_500",
    "precision_at_N",
    "precision_at_50",
    "precision_at_100",
    "precision_at_200",
    "precision_at_500",
    "de_sig_genes_recall",
    "de_direction_match",
    "de_spearman_lfc_sig",
    "roc_auc",
    "pr_auc",
    "de_nsig_counts_real",
    "de_nsig_counts_pred",
)


def _make_pair():
    rng = np.random.default_rng(0)
    n_genes, n_per = 40, 60
    genes = [f"G{i}" for i in range(n_genes)]
    base = rng.uniform(0.2, 3.0, size=n_genes)

    def group(label, scale):
        rates = base.copy()
        if label != CTRL:
            i = int(label[1:])
            rates[i] *= 0.1  # knock-down of the target gene
            rates[10 + 5 * i : 15 + 5 * i] *= scale
        return np.log1p(rng.poisson(rates, size=(n_per, n_genes)).astype(np.float64)), [label] * n_per

    def adata(scale, jitter):
        blocks = [group(p, scale) for p in [CTRL, *PERTS]]
        x = np.vstack([b[0] for b in blocks])
        if jitter:
            x = x + rng.uniform(0, 0.02, size=x.shape) * (x > 0)
        obs = pd.DataFrame({"target": sum((b[1] for b in blocks), [])})
        obs.index = obs.index.astype(str)
        return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=genes))

    real = adata(4.0, jitter=True)
    pred = adata(3.0, jitter=True)
    pred.X[pred.obs["target"].to_numpy() == CTRL] = real.X[real.obs["target"].to_numpy() == CTRL]
    return real, pred


def _ours(real, pred):
    genes = list(real.var_names)
    lab_r, lab_p = real.obs["target"].to_numpy(), pred.obs["target"].to_numpy()
    ctrl_r, ctrl_p = real.X[lab_r == CTRL], pred.X[lab_p == CTRL]
    rows, real_d, pred_d = {}, {}, {}
    for p in PERTS:
        xr, xp = real.X[lab_r == p], pred.X[lab_p == p]
        real_d[p] = xr.mean(0) - ctrl_r.mean(0)
        pred_d[p] = xp.mean(0) - ctrl_p.mean(0)
        de_r = differential_expression(xr, ctrl_r, gene_names=genes)
        de_p = differential_expression(xp, ctrl_p, gene_names=genes)
        de = de_metrics(de_r, de_p, no_sig_value=0.0)
        rows[p] = {
            "mae": mae(xp, xr),
            "mse": mse(xp, xr),
            "mae_delta": mae(xp, xr, control=ctrl_r),
            "mse_delta": mse(xp, xr, control=ctrl_r),
            "pearson_delta": pearson_delta(xp, xr, ctrl_r),
            "de_nsig_counts_real": de["n_sig_real"],
            "de_nsig_counts_pred": de["n_sig_pred"],
            **de,
        }
    for metric in ("l1", "l2", "cosine"):
        pds = discrimination_score(pred_d, real_d, metric=metric, gene_names=genes)
        for p in PERTS:
            rows[p][f"discrimination_score_{metric}"] = pds[p]
    return rows


def test_differential_expression_matches_pdex():
    pdex_mod = pytest.importorskip("pdex")
    real, _ = _make_pair()
    res = pdex_mod.pdex(
        real, groupby="target", mode="ref", reference=CTRL, is_log1p=True, epsilon=0.0, threads=1, as_pandas=True
    )
    assert isinstance(res, pd.DataFrame)
    missing = {"target", "feature", "log2_fold_change", "p_value", "fdr"} - set(res.columns)
    assert not missing, f"pdex result lacks columns {missing}"
    lab = real.obs["target"].to_numpy()
    for p in PERTS:
        ref = res[res["target"] == p].set_index("feature").loc[list(real.var_names)]
        ours = differential_expression(real.X[lab == p], real.X[lab == CTRL], gene_names=list(real.var_names))
        np.testing.assert_allclose(ours["p_value"], ref["p_value"], rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(ours["fdr"], ref["fdr"], rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(ours["log2_fold_change"], ref["log2_fold_change"], rtol=1e-6, atol=1e-9)


def test_metrics_match_cell_eval(tmp_path):
    cell_eval = pytest.importorskip("cell_eval")
    pytest.importorskip("pdex")
    real, pred = _make_pair()
    evaluator = cell_eval.MetricsEvaluator(
        adata_pred=pred,
        adata_real=real,
        control_pert=CTRL,
        pert_col="target",
        num_threads=1,
        outdir=str(tmp_path),
    )
    # break_on_error: a metric that fails inside cell-eval must fail here, not go missing from the table.
    results, _ = evaluator.compute(profile="full", write_csv=False, break_on_error=True)
    frame = results.to_pandas()
    assert "perturbation" in frame.columns, f"cell-eval results have no 'perturbation' column: {list(frame.columns)}"
    frame = frame.set_index("perturbation")
    missing = [m for m in COMPARED if m not in frame.columns]
    assert not missing, f"cell-eval results lack metrics {missing}"
    assert sorted(frame.index) == PERTS
    ours = _ours(real, pred)
    for metric in COMPARED:
        for p in PERTS:
            theirs = float(frame.loc[p, metric])
            if np.isnan(theirs) and np.isnan(ours[p][metric]):
                continue
            assert ours[p][metric] == pytest.approx(theirs, rel=1e-4, abs=1e-5), (metric, p)
