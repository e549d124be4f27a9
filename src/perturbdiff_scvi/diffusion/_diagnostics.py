"""Where along a sampling trajectory values leave the training range: a step callback that keeps per-step stats."""

from __future__ import annotations

import numpy as np
import torch


class RangeMonitor:
    """Per-step range statistics of ``x_t`` and of the clean estimate ``x0``, as a sampling step callback.

    Pass it as ``step_callback`` to :meth:`~perturbdiff_scvi.module.PerturbDiffModule.sample` (or to
    :func:`~perturbdiff_scvi.diffusion.sample_loop_progressive`); at each step it records, for the state entering
    the step (``x_t``) and for the estimate made from it (``x0``), the maximum and the share of entries above
    ``upper``. Calls accumulate over several ``sample`` calls (e.g. one per batch of sets); :meth:`table`
    aggregates them per timestep.

    Parameters
    ----------
    upper
        The top of the training range, in the units of the tensors the callback receives (expression units with
        ``PerturbDiffModule.sample``): a float, or a per-gene vector ``(G,)`` broadcast over the last axis, e.g.
        the per-gene maximum of the training expression.

    Examples
    --------
    >>> monitor = RangeMonitor(train_max_per_gene)
    >>> module.sample(x_ctrl, pert, ctx, batch, step_callback=monitor)  # doctest: +SKIP
    >>> monitor.table()  # one row per timestep, in the order visited  # doctest: +SKIP
    """

    def __init__(self, upper: torch.Tensor | np.ndarray | float):
        self.upper = torch.as_tensor(np.asarray(upper, dtype=np.float32))
        self.records: list[dict] = []

    def __call__(self, t: int, x_t: torch.Tensor, x0: torch.Tensor) -> None:
        record: dict = {"t": int(t), "n_values": int(x0.numel())}
        for name, x in (("x_t", x_t), ("x0", x0)):
            upper = self.upper.to(device=x.device, dtype=x.dtype)
            record[f"{name}_max"] = float(x.max())
            record[f"{name}_n_above"] = int((x > upper).sum())
        self.records.append(record)

    def table(self):
        """A ``pandas.DataFrame``, one row per timestep in the order visited: ``t``, ``x_t_max``,
        ``x_t_share_above``, ``x0_max``, ``x0_share_above`` (shares of all entries at that step, over every call).
        """
        import pandas as pd

        if not self.records:
            raise ValueError("RangeMonitor has recorded nothing yet; pass it as step_callback to a sampling call.")
        raw = pd.DataFrame(self.records)
        order = list(dict.fromkeys(raw["t"]))
        agg = raw.groupby("t", sort=False).agg(
            n_values=("n_values", "sum"),
            x_t_max=("x_t_max", "max"),
            x_t_n_above=("x_t_n_above", "sum"),
            x0_max=("x0_max", "max"),
            x0_n_above=("x0_n_above", "sum"),
        )
        agg = agg.loc[order]
        out = pd.DataFrame({"t": agg.index.to_numpy()})
        for name in ("x_t", "x0"):
            out[f"{name}_max"] = agg[f"{name}_max"].to_numpy()
            out[f"{name}_share_above"] = (agg[f"{name}_n_above"] / agg["n_values"]).to_numpy()
        return out
