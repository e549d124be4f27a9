"""Smoke test of benchmarks/accuracy.py: the --quick path, with --jobs 2 (spawned workers), writes every output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy.py"


@pytest.mark.slow  # trains and evaluates 3 jobs in 2 spawned workers, twice
@pytest.mark.skipif(not SCRIPT.exists(), reason="benchmarks/ is not shipped in the sdist")
def test_quick_benchmark_writes_tables_figures_and_targets(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--jobs", "2", "--tasks", "kang,norman", "--max-steps", "3"]
    done = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("results.csv", "summary.md", "run.json", "metric_bars.png", "delta_scatter_kang.png"):
        assert (out / name).stat().st_size > 0, name
    results = pd.read_csv(out / "results.csv")
    kang = results[results["task"] == "kang"]
    assert set(kang["held_out"]) == {"CD4T", "B"}
    methods = ("PerturbDiff", "PerturbDiff_zeroed", "PerturbDiff_guidance1", "PerturbDiff_steps2", "additive")
    for method in (*methods, "cell_mean", "ceiling"):
        values = kang.loc[(kang["method"] == method) & (kang["metric"] == "pearson_delta"), "value"]
        assert len(values) == 2 and values.notna().all(), method
    assert set(results.loc[results["task"] == "norman", "held_out"]) == {
        "KLF1+MAP2K6",
        "KLF1+TGFBR2",
        "MAP2K3+MAP2K6",
        "MAP2K3+SLC38A2",
        "MAPK1+TGFBR2",
    }
    summary = (out / "summary.md").read_text()
    assert "QUICK RUN" in summary and "## Targets" in summary
    run = json.loads((out / "run.json").read_text())
    assert run["jobs"] == 2 and run["conditions"]["kang"]["CD4T"]["train_steps"] == 3
    # Every finished job was saved; --resume rebuilds the same tables from them without training again.
    assert len(list((out / "jobs").glob("*.pkl"))) == 3  # kang CD4T, B; norman doubles (--quick)
    again = subprocess.run([*cmd, "--out", str(out), "--resume"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed 3 of 3 jobs" in again.stdout
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), results)


@pytest.fixture(scope="module")
def accuracy():
    import importlib.util

    spec = importlib.util.spec_from_file_location("accuracy_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not SCRIPT.exists(), reason="benchmarks/ is not shipped in the sdist")
def test_stress_task_data(accuracy):
    """The dense-panel and McFaline stress cases are what they claim: dense high values; a held-out cell line."""
    import numpy as np

    panel = accuracy.kang_dense_panel()
    assert panel.n_vars == 300 and panel.var_names.is_unique
    assert float(panel.X.max()) > 8 and float((panel.X > 0).mean()) > 0.3  # Kang's 2,000 HVGs: < 0.1 non-zero
    totals = np.expm1(panel.X).sum(axis=1)
    assert np.allclose(totals, 1e4, rtol=1e-3)  # re-normalised over the panel
    line, train, reals, control = next(accuracy.mcfaline_folds(quick=True))
    assert line == "U87MG" and len(reals) == 9 and set(control.obs["perturbation"]) == {"control"}
    in_line = train.obs["cell_type"] == line
    assert set(train.obs.loc[in_line, "perturbation"]) == {"control"}  # only its controls are trained on
    for pert, real in reals.items():
        assert set(real.obs["cell_type"]) == {line} and set(real.obs["perturbation"]) == {pert}
        assert (train.obs["perturbation"] == pert).any()  # seen in the other lines


@pytest.mark.skipif(not SCRIPT.exists(), reason="benchmarks/ is not shipped in the sdist")
def test_variants_and_baselines_are_checked(accuracy, tmp_path):
    """--variants / --baselines pick by name; an unknown name is a usage error naming the choices."""
    for option in ("--variants", "--baselines"):
        with pytest.raises(SystemExit) as exc:
            accuracy.main(["--out", str(tmp_path), option, "bogus"])
        assert exc.value.code == 2
    assert set(accuracy.VARIANTS) <= set(accuracy.MODEL_METHODS)
    assert accuracy.VARIANTS["PerturbDiff_steps2"] == {"n_steps": 2}


@pytest.mark.skipif(not SCRIPT.exists(), reason="benchmarks/ is not shipped in the sdist")
def test_seed_spread_and_stress_check(accuracy):
    """Mean and spread over seeds of per-seed means, and the per-seed comparison with the additive baseline."""
    rows = []
    for seed, (ours, base, top) in enumerate([(0.8, 0.6, 1.2), (0.6, 0.7, 1.7)]):
        for held_out, shift in (("a", 0.0), ("b", 0.1)):
            rows += [(seed, "kang_dense", held_out, "PerturbDiff", "pearson_delta", ours + shift)]
            rows += [(seed, "kang_dense", held_out, "additive", "pearson_delta", base + shift)]
            rows += [(seed, "kang_dense", held_out, "PerturbDiff", "max_over_training", top)]
    results = pd.DataFrame(rows, columns=["seed", "task", "held_out", "method", "metric", "value"])
    spread = accuracy.seed_spread_table(results, "kang_dense")
    assert "| PerturbDiff | 0.750 ± 0.141 |" in spread  # per-seed means 0.85, 0.65
    check = accuracy.stress_check(results, "kang_dense")
    assert "| pearson_delta | higher | 1/2 | 0.750 | 0.700 |" in check
    assert "1.70 (target <= 1.5: NOT REACHED)" in check


@pytest.mark.skipif(not SCRIPT.exists(), reason="benchmarks/ is not shipped in the sdist")
def test_figures_with_a_metric_missing(accuracy, tmp_path):
    """One held-out condition per task has no PDS: the bar figure leaves that panel empty instead of failing."""
    rows = [(0, "kang", "CD4T", m, metric, 0.5) for m in ("PerturbDiff", "additive") for metric in
            accuracy.SUMMARY_METRICS if metric != "discrimination_score_l1"]  # fmt: skip
    results = pd.DataFrame(rows, columns=["seed", "task", "held_out", "method", "metric", "value"])
    accuracy.figures(tmp_path, results, {})
    assert (tmp_path / "metric_bars.png").stat().st_size > 0


POOL = SCRIPT.parent / "pool_results.py"


@pytest.mark.skipif(not POOL.exists(), reason="benchmarks/ is not shipped in the sdist")
def test_pool_results_renames_pools_and_refuses_duplicates(tmp_path):
    """Two runs splitting a task's conditions: renamed per run, pooled, compared seed by seed; overlaps refused."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pool_results", POOL)
    pool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pool)
    columns = ["seed", "task", "held_out", "method", "perturbation", "context", "metric", "value"]
    old_values = {"PerturbDiff": 0.1, "PerturbDiff_steps1": 0.9, "additive": 0.5, "PerturbDiff_steps5": 0.2}
    new_values = {"PerturbDiff": 0.7, "additive": 0.6}
    old = [
        (s, "kang_dense", "a", m, "stimulated", "a", "pearson_delta", v) for s in (0, 1) for m, v in old_values.items()
    ]
    new = [
        (s, "kang_dense", "b", m, "stimulated", "b", "pearson_delta", v) for s in (0, 1) for m, v in new_values.items()
    ]
    for name, rows in (("old", old), ("new", new)):
        (tmp_path / name).mkdir()
        pd.DataFrame(rows, columns=columns).to_csv(tmp_path / name / "results.csv", index=False)
    renames = f"{tmp_path / 'old'}:PerturbDiff=PerturbDiff_steps50,PerturbDiff_steps1=PerturbDiff"
    pool.main(["--run", renames, "--run", str(tmp_path / "new"), "--out", str(tmp_path / "pooled")])
    text = (tmp_path / "pooled" / "summary.md").read_text()
    assert "kang_dense (2 held-out conditions x seeds [0, 1])" in text
    assert "| PerturbDiff | 0.800 ± 0.000 |" in text  # (0.9 + 0.7) / 2: the renamed one-step rows, pooled
    assert "| pearson_delta | higher | 2/2 | 0.800 | 0.550 |" in text
    assert "left out: PerturbDiff_steps5, PerturbDiff_steps50." in text  # only on condition a
    pooled = pd.read_csv(tmp_path / "pooled" / "results.csv")
    assert len(pooled) == len(old) + len(new)
    with pytest.raises(SystemExit, match="more than one run"):
        pool.main(["--run", str(tmp_path / "new"), "--run", str(tmp_path / "new"), "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="OLD=NEW"):
        pool.main(["--run", f"{tmp_path / 'new'}:PerturbDiff", "--out", str(tmp_path / "x")])


CALIBRATION = SCRIPT.parent / "calibration.py"


@pytest.mark.slow  # a subprocess that trains on real data
@pytest.mark.skipif(not CALIBRATION.exists(), reason="benchmarks/ is not shipped in the sdist")
def test_calibration_benchmark_learns_conformal_intervals_on_other_types(tmp_path):
    """Two folds per seed (targets, calibration types); conformal coverage rows and the learnt multipliers."""
    out = tmp_path / "cal"
    cmd = [sys.executable, str(CALIBRATION), "--seeds", "0", "--max-steps", "2", "--n-populations", "3"]
    done = subprocess.run([*cmd, "--n-hvg", "60", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    coverage = pd.read_csv(out / "coverage.csv")
    assert set(coverage["variant"]) == {"default", "zeroed", "calibration_fold", "conformal", "conformal_reverse"}
    assert set(coverage.loc[coverage["variant"].str.startswith("conformal"), "intervals"]) == {"conformal"}
    assert set(coverage.loc[~coverage["variant"].str.startswith("conformal"), "intervals"]) == {"sampled"}
    learnt = pd.read_csv(out / "conformal.csv")
    assert list(learnt["variant"]) == ["conformal", "conformal_reverse"]
    assert (learnt["q_50"] <= learnt["q_80"]).all() and (learnt["q_80"] <= learnt["q_95"]).all()
    sweep = pd.read_csv(out / "offset_sweep.csv").set_index(["variant", "offset_factor"])
    for variant in ("conformal", "conformal_reverse"):  # offset="auto" (4x) is the sweep's 4x row
        got = coverage[coverage["variant"] == variant].set_index("level")["empirical"]
        assert sweep.loc[(variant, 4.0), "coverage_80"] == pytest.approx(got[80])
    groups = pd.read_csv(out / "groups.csv")
    targets = groups.loc[groups["variant"] == "conformal", "context"]
    assert set(targets) == {"CD4 T cells", "CD14+ Monocytes"}  # checked on the targets, learnt elsewhere
    assert "## Conformal intervals" in (out / "summary.md").read_text()
    clash = subprocess.run(
        [*cmd, "--calibrate-on", "CD4 T cells", "--out", str(tmp_path / "x")], capture_output=True, text=True
    )
    assert clash.returncode != 0 and "must not share a cell type" in clash.stderr


PEERS = SCRIPT.parent / "peers.py"


def _load_peers(monkeypatch):
    """benchmarks/peers.py as a module (it imports accuracy.py from its folder; its dataclasses look it up)."""
    import importlib.util

    monkeypatch.syspath_prepend(str(PEERS.parent))
    spec = importlib.util.spec_from_file_location("peers_benchmark", PEERS)
    peers = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, peers)
    spec.loader.exec_module(peers)
    return peers


@pytest.mark.skipif(not PEERS.exists(), reason="benchmarks/ is not shipped in the sdist")
def test_peers_summary_counts_a_seed_only_where_it_covers_all_folds(tmp_path, monkeypatch):
    """A seed run on one fold of two is left out of that method's row, not averaged with the complete seeds."""
    peers = _load_peers(monkeypatch)
    rows, runs = [], []
    values = {("PerturbDiff", 0, "a"): 0.9, ("PerturbDiff", 0, "b"): 0.7, ("PerturbDiff", 1, "a"): 0.1}
    values.update({("CellFlow", 0, "a"): 0.6, ("CellFlow", 0, "b"): 0.4, ("CellFlow", 1, "a"): 0.8})
    values.update({("CellFlow", 1, "b"): 0.6})
    for (method, seed, fold), v in values.items():
        rows.append(
            {"task": "kang", "fold": fold, "seed": seed, "method": method, "metric": "pearson_delta", "value": v}
        )
        runs.append({"task": "kang", "fold": fold, "seed": seed, "method": method, "train_seconds": 10.0 * (1 + seed),
                     "status": "ok", "n_cannot": 0})  # fmt: skip
    text = peers.summarise(pd.DataFrame(rows), pd.DataFrame(runs), tmp_path)
    assert "| PerturbDiff | 2 | 1 | 10 | **0.800 ± 0.000** |" in text  # seed 1 (fold a only) left out
    assert "| CellFlow | 2 | 2 | 15 | 0.600 ± 0.141 |" in text  # seeds 0 and 1: 0.5 and 0.7
    assert (tmp_path / "summary.md").read_text() == text


@pytest.mark.skipif(not PEERS.exists(), reason="benchmarks/ is not shipped in the sdist")
def test_peers_summary_never_bolds_a_baseline(tmp_path, monkeypatch):
    """The kernel transfer is scored beside the methods but, like the additive shift, never marked best."""
    peers = _load_peers(monkeypatch)
    values = {"PerturbDiff": 0.9, "CellFlow": 0.8, "kernel transfer": 0.95, "additive": 0.99}
    rows = [{"task": "kang", "fold": "a", "seed": 0, "method": m, "metric": "pearson_delta", "value": v}
            for m, v in values.items()]  # fmt: skip
    runs = [{"task": "kang", "fold": "a", "seed": 0, "method": m, "train_seconds": 1.0, "status": "ok", "n_cannot": 0}
            for m in values]  # fmt: skip
    text = peers.summarise(pd.DataFrame(rows), pd.DataFrame(runs), tmp_path)
    assert "| PerturbDiff | 1 | 1 | 1 | **0.900 ± 0.000** |" in text
    assert "| kernel transfer | 1 | 1 | 1 | 0.950 ± 0.000 |" in text and "**0.950" not in text


@pytest.mark.skipif(not PEERS.exists(), reason="benchmarks/ is not shipped in the sdist")
def test_peers_merge_keeps_methods_that_were_not_rescored(monkeypatch):
    """Rescoring one method of a fold (the others' jobs gone from disk) replaces that method's rows only."""
    peers = _load_peers(monkeypatch)
    base = {"task": "kang", "fold": "CD4T", "seed": 0, "metric": "e_distance"}
    old = pd.DataFrame([{**base, "method": "PerturbDiff", "value": 0.7}, {**base, "method": "CellFlow", "value": 0.2}])
    new = pd.DataFrame([{**base, "method": "PerturbDiff", "value": 0.5}])
    run = {"task": "kang", "fold": "CD4T", "seed": 0}
    old_runs = pd.DataFrame(
        [{**run, "method": m, "status": "ok", "train_seconds": 1.0} for m in ("PerturbDiff", "CellFlow")]
    )
    new_runs = pd.DataFrame([{**run, "method": "PerturbDiff", "status": "ok", "train_seconds": 2.0},
                             {**run, "method": "CellFlow", "status": "missing"}])  # fmt: skip
    results, runs = peers.merge(old, old_runs, new, new_runs)
    assert dict(zip(results["method"], results["value"], strict=True)) == {"CellFlow": 0.2, "PerturbDiff": 0.5}
    assert dict(zip(runs["method"], runs["status"], strict=True)) == {"CellFlow": "ok", "PerturbDiff": "ok"}
    assert runs.loc[runs["method"] == "PerturbDiff", "train_seconds"].item() == 2.0


def test_speed_released_expected_step_weights_the_coin_states(monkeypatch):
    """The step time is a mixture over the coins drawn in a step: the expectation weights each state's median by its
    probability, where the median of all steps lands on whichever state was drawn more often."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "speed_released.py"
    if not script.exists():
        pytest.skip("benchmarks/ is not shipped in the sdist")
    monkeypatch.syspath_prepend(str(script.parent))  # it imports speed.py from its folder
    spec = importlib.util.spec_from_file_location("speed_released_benchmark", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    ours = mod.state_probabilities(0.5, None)
    assert ours == {"self-cond on": 0.5, "self-cond off": 0.5}
    released = mod.state_probabilities(0.5, 0.5)
    assert len(released) == 4 and abs(sum(released.values()) - 1) < 1e-12
    assert mod._state_name((None, None)) == "self-cond on" and mod._state_name((None,)) == "self-cond off"
    assert mod._state_name((True,)) == "self-cond off, cond dropped"
    # 6 cheap steps and 2 dear ones at p = 1/2: the median says 2.0, the cost per step of a long run is 2.5.
    times = [2.0] * 6 + [3.0] * 2
    states = ["self-cond off"] * 6 + ["self-cond on"] * 2
    assert mod.expected_step(times, states, ours) == pytest.approx(2.5)
    assert mod.expected_step(times[:6], states[:6], ours) is None  # a state never drawn: no expectation
    assert mod.expected_step([1.0], ["self-cond off"], mod.state_probabilities(0.0, None)) == 1.0
