"""Smoke test of benchmarks/accuracy.py: the --quick path, with --jobs 2 (spawned workers), writes every output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy.py"


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
    for method in ("PerturbDiff", "PerturbDiff_zeroed", "PerturbDiff_guidance1", "additive", "cell_mean", "ceiling"):
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
