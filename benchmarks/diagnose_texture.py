"""Where a classifier tells predicted from real cells: per-gene distributions, or how the genes go together in a cell.

For each case and seed, one default model (``diagnose_realism.py``'s cases: stimulated CD4T held out of Kang 2018,
2,000 HVGs, or of its dense 300-gene panel) is trained and its one-step prediction (guidance 0.5 and 0) is
compared with the real held-out cells after oracle repairs that use the real cells (not available to a user; they
bound what each kind of fix can give):

- ``pred``: the prediction as returned;
- ``pred, real means``: its per-gene means replaced by the real ones (shift of every cell);
- ``pred, real marginals``: each gene moved by rank onto the real cells' distribution of the gene (quantile map);
  keeps how the prediction's genes go together in a cell (its copula), fixes every per-gene distribution;
- ``control, real means``: the control cells shifted by the real per-gene mean change;
- ``control, real marginals``: the control cells quantile-mapped gene by gene onto the real cells: real copula
  (of the control cells), real marginals;
- ``control, pred marginals``: the control cells quantile-mapped onto the prediction's marginals, what
  ``predict_population(transport="quantile")`` returns.

Then where the prediction's variation comes from: 20 draws of the starting noise for one fixed control set of
64 cells; per top-10 PC of the training cells, the standard deviation across noises (cell fixed), across cells
(averaged over noises), and the correlation of a cell's mean prediction with its own control cell, each divided
by the real cells' standard deviation.

Outputs (``--out``): ``texture.csv``, ``texture.md``, ``run.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import KEYS, PERT, md, quiet_logs
from diagnose_realism import HELD_OUT_TYPE, case_data, train_model

from perturbdiff_scvi import baselines, tl
from perturbdiff_scvi._constants import PDIFF_KEYS
from perturbdiff_scvi.metrics import fit_pca

METRICS = ["pearson_delta", "e_distance", "c2st_auroc", "knn_mixing", "spread_ratio_mean_abs_log"]


def dense(a) -> np.ndarray:
    return np.asarray(a.X.toarray() if hasattr(a.X, "toarray") else a.X, dtype=np.float64)


def quantile_map(cells: np.ndarray, target: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each gene of ``cells`` moved by rank (ties at random) onto the distribution of the gene in ``target``."""
    out = np.empty_like(cells)
    for g in range(cells.shape[1]):
        key = cells[:, g] + 1e-9 * rng.random(cells.shape[0])
        ranks = np.argsort(np.argsort(key)) / max(cells.shape[0] - 1, 1)
        out[:, g] = np.quantile(target[:, g], ranks)
    return out


def repairs(pred, real, control, rng) -> dict:
    p, r = dense(pred), dense(real)
    c = dense(control)[rng.choice(control.n_obs, real.n_obs, replace=control.n_obs < real.n_obs)]
    rows = {
        "pred": p,
        "pred, real means": p - p.mean(0) + r.mean(0),
        "pred, real marginals": quantile_map(p, r, rng),
        "control, real means": c - c.mean(0) + r.mean(0),
        "control, real marginals": quantile_map(c, r, rng),
        "control, pred marginals": quantile_map(c, p, rng),
    }
    out = {}
    for name, x in rows.items():
        a = pred.copy()
        a.X = np.clip(x, 0, None).astype(np.float32)
        out[name] = a
    return out


def decomposition(model, train, real, control, seed: int, guidance: float) -> pd.DataFrame:
    """Per top-10 PC: noise part, cell part and control correlation of the one-step prediction (see module doc)."""
    pca = fit_pca(dense(train), n_comps=10)
    sd_real = pca(dense(real)).std(0)
    rng = np.random.default_rng(seed)
    ctrl = dense(control)[rng.choice(control.n_obs, model.module.set_size, replace=False)]
    codes = {k: model.adata_manager.get_state_registry(k).categorical_mapping for k in
             (PDIFF_KEYS.PERT_KEY, PDIFF_KEYS.CONTEXT_KEY)}  # fmt: skip
    pert = int(np.flatnonzero(codes[PDIFF_KEYS.PERT_KEY] == PERT)[0])
    ctx = int(np.flatnonzero(codes[PDIFF_KEYS.CONTEXT_KEY] == HELD_OUT_TYPE)[0])
    n = 20
    x = torch.tensor(ctrl, dtype=torch.float32)[None].repeat(n, 1, 1)
    out = model.module.sample(
        x, torch.full((n,), pert), torch.full((n,), ctx), torch.zeros(n, dtype=torch.long), n_steps=1,
        guidance_scale=guidance, generator=torch.Generator().manual_seed(seed),
        x0_max=torch.as_tensor(1.5 * dense(train).max(0), dtype=torch.float32),
    ).numpy()  # fmt: skip
    z = pca(out.reshape(-1, out.shape[-1])).reshape(n, model.module.set_size, -1)  # (noise, cell, PC)
    cell_mean = z.mean(0)
    zc = pca(ctrl)
    return pd.DataFrame(
        {
            "pc": np.arange(1, 11),
            "total_sd_ratio": z.reshape(-1, 10).std(0) / sd_real,
            "noise_sd_ratio": z.std(0).mean(0) / sd_real,
            "cell_sd_ratio": cell_mean.std(0) / sd_real,
            "corr_with_own_control": [np.corrcoef(cell_mean[:, k], zc[:, k])[0, 1] for k in range(10)],
            "control_sd_ratio": zc.std(0) / sd_real,
        }
    )


def parse_case_args(description: str, argv=None) -> tuple[argparse.Namespace, list[int]]:
    """The command line of the case diagnoses (``--out --cases --seeds --max-steps --threads``), applied.

    Quiets the logs, sets the torch threads and creates ``--out``; returns the arguments and the seeds.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--cases", default="kang_heldout,dense_heldout")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--max-steps", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    quiet_logs()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    return args, [int(s) for s in args.seeds.split(",")]


def trained_cases(args: argparse.Namespace, seeds: list[int]):
    """Per seed and case: ``(seed, case, train, real, control, model)`` with a freshly trained default model."""
    for seed in seeds:
        for case in args.cases.split(","):
            train, real, control = case_data(case)
            yield seed, case, train, real, control, train_model(train.copy(), "default", args.max_steps, seed)


def main(argv=None) -> None:
    args, seeds = parse_case_args(__doc__.split("\n")[0], argv)
    start, records, decomp = time.time(), [], []
    for seed, case, train, real, control, model in trained_cases(args, seeds):
        common = {"pca_reference": train, "seed": seed, **KEYS}
        half, reference = baselines.half_vs_half_ceiling(real, seed=seed, **KEYS)
        records.append(tl.evaluate({"ceiling": half}, reference, control, baseline=None, **common)
                       .assign(case=case, seed=seed, guidance="-"))  # fmt: skip
        for g in (0.5, 0.0):
            pred = model.predict_population(PERT, contexts=HELD_OUT_TYPE, n_cells=real.n_obs, seed=seed,
                                            guidance_scale=g)  # fmt: skip
            rows = repairs(pred, real, control, np.random.default_rng(seed))
            t = tl.evaluate(rows, real, control, baseline=None, **common)
            records.append(t.assign(case=case, seed=seed, guidance=g))
            decomp.append(decomposition(model, train, real, control, seed, g).assign(case=case, seed=seed,
                                                                                     guidance=g))  # fmt: skip
        print(f"[{case}, seed {seed}] done at {time.time() - start:.0f} s")
    results = pd.concat(records, ignore_index=True)
    results = results[results["metric"].isin(METRICS)]
    results.to_csv(args.out / "texture.csv", index=False)
    dec = pd.concat(decomp, ignore_index=True)
    dec.to_csv(args.out / "decomposition.csv", index=False)
    lines = [f"# Texture diagnosis\n\nCommand: `{' '.join(sys.argv)}`; seeds {seeds}, {args.max_steps} steps, "
             f"{time.time() - start:.0f} s. Values: mean over seeds.\n"]  # fmt: skip
    for case, sub in results.groupby("case", sort=False):
        sub = sub.assign(row=sub["method"] + np.where(sub["guidance"].astype(str) == "-", "",
                                                      " (guidance " + sub["guidance"].astype(str) + ")"))  # fmt: skip
        pivot = sub.pivot_table(index="row", columns="metric", values="value", sort=False)
        lines += [f"## {case}", "", md(pivot.reindex(columns=[m for m in METRICS if m in pivot.columns])), ""]
    for (case, g), sub in dec.groupby(["case", "guidance"], sort=False):
        mean = sub.drop(columns=["case", "seed", "guidance"]).groupby("pc").mean()
        lines += [f"## Where the variation comes from: {case}, guidance {g}", "", md(mean), ""]
    (args.out / "texture.md").write_text("\n".join(lines) + "\n")
    (args.out / "run.json").write_text(json.dumps({**vars(args), "seeds": seeds}, default=str, indent=2))
    print(f"done in {time.time() - start:.0f} s; {args.out / 'texture.md'}")


if __name__ == "__main__":
    main()
