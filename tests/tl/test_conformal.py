"""``tl.conformal_intervals``: split-conformal log-fold-change intervals, on synthetic data with known answers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from perturbdiff_scvi import tl

from .test_populations import _groups, truth  # noqa: F401  (the fixture)


def _result(real, mean, sd, groups=None) -> tl.CalibrationResult:
    per_gene = pd.DataFrame({"real_lfc": real, "lfc_mean": mean, "lfc_sd": sd})
    if groups is not None:
        per_gene["group"] = groups
    empty = pd.DataFrame()
    return tl.CalibrationResult(coverage=empty, rank_histogram=empty, per_gene=per_gene, groups=empty)


def test_quantile_rule_and_interval_by_hand():
    errors = np.arange(1.0, 10.0)  # |real - mean| = 1 .. 9, sd 1, offset 0: scores 1 .. 9
    ci = tl.conformal_intervals(_result(errors, np.zeros(9), np.ones(9), groups=[0, 1, 2] * 3), offset=0)
    assert ci.offset == 0 and ci.n_groups == 3
    np.testing.assert_array_equal(ci.scores, errors)
    assert ci.quantile(0.8) == 8.0  # the ceil((9 + 1) 0.8) = 8th smallest
    assert ci.quantile(0.5) == 5.0
    assert ci.quantile(0.95) == math.inf  # ceil(9.5) = 10 > n: no finite interval has the guarantee
    lo, hi = ci.interval(np.array([1.0, -1.0]), np.array([0.5, 0.0]), 0.5)
    np.testing.assert_allclose(lo, [1.0 - 2.5, -1.0])
    np.testing.assert_allclose(hi, [1.0 + 2.5, -1.0])
    # the default offset is 4x the median sampled sd: scores |e| / (sd + 4 median(sd))
    auto = tl.conformal_intervals(_result([2.0, 0.0, 3.0], [0.0, 0.0, 0.0], [1.0, 3.0, 0.0]))
    assert auto.offset == 4.0
    np.testing.assert_allclose(auto.scores, [0.0, 2.0 / 5.0, 3.0 / 4.0])
    # no spread and no error scores 0; no spread with an error scores inf; non-finite rows are dropped
    edge = tl.conformal_intervals(_result([0.0, 1.0, np.nan], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]), offset=0)
    np.testing.assert_array_equal(edge.scores, [0.0, math.inf])


def test_conformal_intervals_repair_narrow_and_biased_populations(truth):  # noqa: F811
    """Intervals learnt on 6 held-out donors cover about the nominal share of 6 other donors' log fold changes,
    where the samples' own intervals (too narrow, or shifted) cover far less."""
    rng, mu, sd, real, control = truth
    donor = real.obs["donor"].astype(int)
    cal, target = real[donor < 6].copy(), real[donor >= 6].copy()
    kwargs = {"group_key": "donor", "perturbation_key": "condition"}
    for pred in (
        _groups(40, real.n_vars, mu, sd / 5, key="population", rng=rng),  # too narrow
        _groups(40, real.n_vars, mu, sd, key="population", rng=rng, shift=1.0),  # biased
    ):
        sampled = tl.calibration(pred, target, control, **kwargs).coverage.set_index("level")
        assert sampled.loc["80", "empirical"] < 0.6 and (sampled["intervals"] == "sampled").all()
        ci = tl.conformal_intervals(tl.calibration(pred, cal, control, **kwargs))
        assert ci.n_groups == 6 and len(ci.scores) == 6 * real.n_vars
        checked = tl.calibration(pred, target, control, conformal=ci, **kwargs)
        cov = checked.coverage.set_index("level")
        assert (cov["intervals"] == "conformal").all() and (cov["max_attainable"] == 1.0).all()
        np.testing.assert_allclose(cov["empirical"], cov["nominal"], atol=0.07)
        per_gene = checked.per_gene
        half = ci.quantile(0.8) * (per_gene["lfc_sd"] + ci.offset)
        np.testing.assert_allclose(per_gene["lfc_upper_80"], per_gene["lfc_mean"] + half)
        # the ranks and z stay those of the samples
        np.testing.assert_array_equal(per_gene["z"], tl.calibration(pred, target, control, **kwargs).per_gene["z"])


def test_population_summary_with_conformal_intervals(truth):  # noqa: F811
    rng, mu, sd, real, control = truth
    pred = _groups(10, real.n_vars, mu, sd, key="population", rng=rng)
    ci = tl.conformal_intervals(_result(np.arange(1.0, 100.0), np.zeros(99), np.ones(99)), offset=0.5)
    plain = tl.population_summary(pred, control, perturbation_key="condition", n_pcs=None)
    wide = tl.population_summary(pred, control, perturbation_key="condition", n_pcs=None, conformal=ci)
    assert plain.attrs["lfc_intervals"] == "sampled" and wide.attrs["lfc_intervals"] == "conformal"
    for level, tag in ((0.5, "50"), (0.8, "80"), (0.95, "95")):
        half = ci.quantile(level) * (wide["lfc_sd"] + 0.5)
        np.testing.assert_allclose(wide[f"lfc_lower_{tag}"], wide["lfc_mean"] - half)
        np.testing.assert_allclose(wide[f"lfc_upper_{tag}"], wide["lfc_mean"] + half)
    import matplotlib

    matplotlib.use("Agg")
    from perturbdiff_scvi import pl

    labels = [t.get_text() for t in pl.lfc_intervals(wide, n_top=5).get_legend().get_texts()]
    assert "80 % conformal interval" in labels
    assert "80 % interval" in [t.get_text() for t in pl.lfc_intervals(plain, n_top=5).get_legend().get_texts()]
    same = [c for c in plain.columns if not c.startswith("lfc_lower") and not c.startswith("lfc_upper")]
    pd.testing.assert_frame_equal(wide[same], plain[same])  # means, sds, p_up, expression intervals unchanged


def test_conformal_errors(truth):  # noqa: F811
    rng, mu, sd, real, control = truth
    pred = _groups(5, real.n_vars, mu, sd, key="population", rng=rng)
    with pytest.raises(TypeError, match="needs the result of tl.calibration"):
        tl.conformal_intervals(pred)
    good = _result([1.0, 2.0], [0.0, 0.0], [1.0, 1.0])
    for bad in (-1.0, math.nan, "mean"):
        with pytest.raises(ValueError, match="offset must be"):
            tl.conformal_intervals(good, offset=bad)
    with pytest.raises(ValueError, match="no finite"):
        tl.conformal_intervals(_result([np.nan], [0.0], [1.0]))
    with pytest.raises(TypeError, match="conformal must be the result of tl.conformal_intervals"):
        tl.calibration(pred, real, control, group_key="donor", perturbation_key="condition", conformal=good)
    with pytest.raises(TypeError, match="conformal must be"):
        tl.population_summary(pred, control, perturbation_key="condition", conformal=0.8)
