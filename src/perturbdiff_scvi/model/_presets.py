"""Presets and defaults of the user-facing model: the released sizes and the measured small-data defaults."""

from __future__ import annotations

from .._validation import finite_number, positive_int
from ..diffusion import DEFAULT_GUIDANCE_SCALE
from ._options import DiffusionOptions

#: The sizes and options of the released model (Yuan et al. 2026), for GPUs: ``PerturbDiff(adata, **PAPER_CONFIG)``;
#: predict with the released ``guidance_scale=1.0``.
PAPER_CONFIG: dict = {
    "n_hidden": 512,
    "depth": 8,
    "n_heads": 8,
    "n_cov": 128,
    "set_size": 256,
    "options": DiffusionOptions(input_scale=10.0, ema_every=10, p_drop_cond=0.5),
}

#: Optimisation steps when ``train()`` is given neither ``max_epochs`` nor ``max_steps``.
DEFAULT_MAX_STEPS = 1500

__all__ = ["DEFAULT_GUIDANCE_SCALE", "DEFAULT_MAX_STEPS", "PAPER_CONFIG", "check_hyperparameters"]


def check_hyperparameters(**hp) -> dict:
    """The constructor's sizes and :class:`DiffusionOptions`, checked, as the module's keyword arguments.

    Every bad value raises a ``ValueError`` naming the argument before torch builds a layer.
    """
    for name in ("set_size", "n_hidden", "depth", "n_heads", "n_cov", "n_timesteps", "ema_every"):
        hp[name] = positive_int(hp[name], name)
    if hp["n_cov_hidden"] is not None:
        hp["n_cov_hidden"] = positive_int(hp["n_cov_hidden"], "n_cov_hidden", allow_none=True)
    if (2 * hp["n_hidden"]) % hp["n_heads"]:
        raise ValueError(f"2 * n_hidden ({2 * hp['n_hidden']}) must be divisible by n_heads ({hp['n_heads']}).")
    if hp["beta_schedule"] not in ("linear", "cosine"):
        raise ValueError(f"beta_schedule must be 'linear' or 'cosine'; got {hp['beta_schedule']!r}.")
    for name in ("mlp_ratio", "input_scale"):
        hp[name] = finite_number(hp[name], name, minimum=0)
        if hp[name] == 0:
            raise ValueError(f"{name} must be > 0; got {hp[name]!r}.")
    for name in ("energy_weight", "mse_weight"):
        hp[name] = finite_number(hp[name], name, minimum=0)
    if hp["energy_weight"] == 0 and hp["mse_weight"] == 0:
        raise ValueError("energy_weight and mse_weight are both 0: the loss would be 0; keep at least one > 0.")
    if hp["energy_weighting"] not in ("constant", "abar"):
        raise ValueError(f"energy_weighting must be 'constant' (released) or 'abar'; got {hp['energy_weighting']!r}.")
    if hp["preconditioning"] == "edm_shrink":
        raise ValueError(
            "preconditioning='edm_shrink' was removed in 0.2.0 (measured: no gain in realism, lower pearson_delta); "
            "use 'none' (released) or 'edm'."
        )
    if hp["preconditioning"] not in ("none", "edm"):
        raise ValueError(f"preconditioning must be 'none' (released) or 'edm'; got {hp['preconditioning']!r}.")
    for name in ("p_drop_cond", "p_self_cond", "ema_decay"):
        hp[name] = finite_number(hp[name], name, minimum=0)
        if hp[name] > 1:
            raise ValueError(f"{name} is a probability / decay and must lie in [0, 1]; got {hp[name]!r}.")
    if not isinstance(hp["context_embedding"], bool):
        raise ValueError(f"context_embedding must be True or False; got {hp['context_embedding']!r}.")
    if not isinstance(hp["control_skip"], bool):
        raise ValueError(f"control_skip must be True or False; got {hp['control_skip']!r}.")
    if hp["control_skip"] and hp["preconditioning"] != "none":
        raise ValueError(
            "control_skip=True adds the paired control cell to the denoiser's output and needs "
            f"preconditioning='none'; got preconditioning={hp['preconditioning']!r}."
        )
    if not isinstance(hp["reference_shift"], bool):
        raise ValueError(f"reference_shift must be True or False; got {hp['reference_shift']!r}.")
    if hp["reference_shift"] and (hp["preconditioning"] != "none" or hp["control_skip"]):
        raise ValueError(
            "reference_shift=True adds the reference response to the denoiser's output and needs "
            f"preconditioning='none' and control_skip=False; got preconditioning={hp['preconditioning']!r}, "
            f"control_skip={hp['control_skip']!r}."
        )
    return hp
