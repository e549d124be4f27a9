"""PerturbDiffModule: the functional-diffusion maths as an scvi-tools ``BaseModuleClass``.

scvi's hooks map onto diffusion as: ``inference`` = read the condition (control set and covariate
codes), ``generative`` = noise the target set and denoise it, ``loss`` = MSE + energy distance.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch.optim.swa_utils import get_ema_multi_avg_fn

from .._constants import PDIFF_KEYS
from ..diffusion import DEFAULT_GUIDANCE_SCALE, DEFAULT_N_STEPS, GaussianDiffusion, StepCallback, sample_loop
from ..nn import SetDiT
from ._losses import energy_distance, per_set_mse


class PerturbDiffModule(BaseModuleClass):
    """Set diffusion over cell populations (Yuan et al. 2026), x0-parameterised, with EMA weights.

    As released, the target cells of a training set meet the tokens of its control cells as drawn (the per-cell
    MSE compares token ``i``'s estimate with target cell ``i``), and each set's timestep is drawn uniformly.

    Parameters
    ----------
    n_genes, n_perturbations, n_contexts, n_batches
        Sizes read from the registered AnnData (``n_perturbations`` counts components when
        ``perturbation_components`` is given).
    perturbation_components
        Optional ``(n_labels, K)`` integer tensor: row ``i`` holds the component codes of registered
        perturbation ``i`` (``-1`` = padding; the control has none). Combinations are then embedded as the
        sum of their components, so an unseen ``A+B`` can be generated from components seen in training.
    perturbation_features
        Optional ``(n_perturbations, F)`` float table (with ``perturbation_components`` indexing its rows): the
        perturbation embedding is then computed from these features by a
        :class:`~perturbdiff_scvi.nn.FeatureEncoder` instead of looked up, so a perturbation never trained on
        can be embedded from its features. The table is not part of the ``state_dict`` (the model stores it).
    set_size
        Cells per set ``S``.
    n_hidden, depth, n_heads, mlp_ratio, n_cov, n_cov_hidden
        Denoiser sizes, see :class:`~perturbdiff_scvi.nn.SetDiT`.
    n_timesteps
        Diffusion steps ``T``.
    beta_schedule
        ``"linear"`` (released) or ``"cosine"``.
    input_scale
        Expression is divided by this before diffusion and multiplied back after sampling (the released
        runs use ``normalize_counts=10``; 1 by default here).
    energy_weight, mse_weight
        Loss = ``mse_weight * MSE + energy_weight * energy``, energy being half the energy distance.
    energy_weighting
        ``"constant"`` (released): the energy term has the same weight at every timestep. ``"abar"``: it is
        multiplied by ``abar_t`` of each set's timestep, so it acts where ``x0`` is nearly determined by ``x_t``
        (low noise) and fades where the best estimate is a conditional mean (high noise).
    preconditioning, sigma_data
        ``"none"`` (released): the denoiser's output is the ``x0`` estimate. ``"edm"`` (Karras et al. 2022, in
        VP form): ``x0 = relu(c_skip x_t / sqrt(abar) + c_out F)`` with ``sigma^2 = (1 - abar) / abar``,
        ``c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)`` and ``c_out = sigma sigma_data / sqrt(sigma^2 +
        sigma_data^2)``, so that at low noise the estimate passes the state through instead of rebuilding every
        gene of every cell from the ``n_hidden``-wide token. ``sigma_data``: standard deviation of the data in
        diffusion units.
    p_drop_cond
        Probability per set of replacing the covariates by the null embedding (classifier-free guidance).
    p_self_cond
        Probability per step of the self-conditioning pass.
    ema_decay, ema_every
        EMA of the denoiser weights, updated every ``ema_every`` optimiser steps.
    context_embedding
        Embed the context with the covariates (released); ``False``: only through the matched control cells.
    control_skip
        ``False`` (released): the denoiser outputs ``x0``. ``True``: it outputs the change from the control cell
        each token is index-paired with, ``x0_i = relu(x_ctrl_i + F_i)`` (needs ``preconditioning="none"``).
    reference_shift
        Optional ``(n_labels, n_contexts, G)`` float table of reference responses (expression units): the
        denoiser's output is then added to entry ``(perturbation code, context code)`` of its set, ``x0 = relu(F +
        r)`` (needs ``preconditioning="none"`` and ``control_skip=False``). A buffer: saved with the weights.
    """

    def __init__(
        self,
        n_genes: int,
        n_perturbations: int,
        n_contexts: int,
        n_batches: int,
        *,
        perturbation_components: torch.Tensor | None = None,
        perturbation_features: torch.Tensor | None = None,
        set_size: int = 64,
        n_hidden: int = 128,
        depth: int = 2,
        n_heads: int = 4,
        mlp_ratio: float = 4.0,
        n_cov: int = 64,
        n_cov_hidden: int | None = None,
        n_timesteps: int = 1000,
        beta_schedule: Literal["linear", "cosine"] = "linear",
        input_scale: float = 1.0,
        energy_weight: float = 1.0,
        mse_weight: float = 1.0,
        energy_weighting: Literal["constant", "abar"] = "constant",
        preconditioning: Literal["none", "edm"] = "none",
        sigma_data: float = 1.0,
        p_drop_cond: float = 0.2,
        p_self_cond: float = 0.5,
        ema_decay: float = 0.99,
        ema_every: int = 1,
        context_embedding: bool = True,
        control_skip: bool = False,
        reference_shift: torch.Tensor | None = None,
    ):
        super().__init__()
        if preconditioning not in ("none", "edm"):
            raise ValueError(f"preconditioning must be 'none' or 'edm'; got {preconditioning!r}.")
        if control_skip and preconditioning != "none":
            raise ValueError("control_skip=True needs preconditioning='none'.")
        if reference_shift is not None and (control_skip or preconditioning != "none"):
            raise ValueError("reference_shift needs preconditioning='none' and control_skip=False.")
        self.n_genes = n_genes
        self.set_size = set_size
        self.input_scale = input_scale
        self.energy_weight = energy_weight
        self.mse_weight = mse_weight
        self.energy_weighting = energy_weighting
        self.preconditioning = preconditioning
        self.control_skip = control_skip
        self.sigma_data = float(sigma_data)
        self.p_drop_cond = p_drop_cond
        self.p_self_cond = p_self_cond
        self.ema_decay = ema_decay
        self.ema_every = ema_every
        self.denoiser = SetDiT(
            n_genes,
            n_perturbations,
            n_contexts,
            n_batches,
            n_hidden=n_hidden,
            depth=depth,
            n_heads=n_heads,
            mlp_ratio=mlp_ratio,
            n_cov=n_cov,
            n_cov_hidden=n_cov_hidden,
            nonnegative=preconditioning == "none" and not control_skip and reference_shift is None,
            perturbation_features=perturbation_features,
            context_embedding=context_embedding,
        )
        self.ema = copy.deepcopy(self.denoiser).requires_grad_(False)
        if perturbation_components is not None:
            self.register_buffer("perturbation_components", torch.as_tensor(perturbation_components, dtype=torch.long))
        else:
            self.perturbation_components = None
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        if reference_shift is not None:  # diffusion units, like the sets
            self.register_buffer("reference_shift", torch.as_tensor(reference_shift, dtype=torch.float32) / input_scale)
        else:
            self.reference_shift = None
        self.diffusion = GaussianDiffusion(n_timesteps, beta_schedule)

    def _x0(self, net, x_t: torch.Tensor, t: torch.Tensor, *condition, ref: torch.Tensor | None = None) -> torch.Tensor:
        """The clean estimate of ``net`` at ``(x_t, t)``, with the preconditioning (or the reference ``ref``,
        ``(B, G)``) applied."""
        out = net(x_t, t, *condition)
        if ref is not None:
            return torch.relu(out + ref.unsqueeze(1).to(out.dtype))
        if self.control_skip:  # condition[0] is x_ctrl, index-paired with the cells of x_t
            return torch.relu(condition[0] + out)
        if self.preconditioning == "none":
            return out
        abar = self.diffusion.alphas_cumprod[t].to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))
        sigma2 = (1 - abar) / abar
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma2 + sd2)
        c_out = (sigma2 * sd2 / (sigma2 + sd2)).sqrt()
        return torch.relu(c_skip * (x_t / abar.sqrt()) + c_out * out)

    # ----------------------------------------------------------------- batch layout
    def reference(self, codes: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor | None:
        """The reference responses ``(B, G)`` of registered perturbation ``codes`` (``-1``: never registered, 0)
        in contexts ``ctx``, or ``None`` without ``reference_shift``."""
        if self.reference_shift is None:
            return None
        table = self.reference_shift
        codes, ctx = codes.to(table.device).long(), ctx.to(table.device).long()
        ref = table[codes.clamp(min=0), ctx]
        return torch.where((codes >= 0).unsqueeze(-1), ref, torch.zeros_like(ref))

    def _unpack(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Flat ``[P1, C1, P2, C2, ...]`` rows -> perturbed ``(B, S, G)``, control ``(B, S, G)``, codes ``(B,)``
        (and the reference responses ``(B, G)`` with ``reference_shift``)."""
        x = tensors[PDIFF_KEYS.X_KEY]
        b = x.shape[0] // (2 * self.set_size)
        x = x.view(b, 2, self.set_size, -1) / self.input_scale

        def code(key: str) -> torch.Tensor:
            return tensors[key].reshape(b, 2, self.set_size)[:, 0, 0].long()

        pert = code(PDIFF_KEYS.PERT_KEY)
        ctx = code(PDIFF_KEYS.CONTEXT_KEY)
        ref = self.reference(pert, ctx)
        if self.perturbation_components is not None:
            pert = self.perturbation_components.to(pert.device)[pert]  # (B, K) component codes
        out = {"x0": x[:, 0], "x_ctrl": x[:, 1], "pert": pert, "ctx": ctx, "batch": code(PDIFF_KEYS.BATCH_KEY)}
        if ref is not None:
            out["ref"] = ref
        return out

    def _get_inference_input(self, tensors: dict[str, torch.Tensor], **kwargs) -> dict[str, torch.Tensor]:
        # The one unpacking (and scaling by input_scale) of the batch per step: the target sets ride along in
        # the inference outputs to the generative step and the loss.
        return self._unpack(tensors)

    @auto_move_data
    def inference(
        self,
        x0: torch.Tensor,
        x_ctrl: torch.Tensor,
        pert: torch.Tensor,
        ctx: torch.Tensor,
        batch: torch.Tensor,
        ref: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The condition of each set; per-set classifier-free-guidance dropout is drawn here."""
        drop = torch.rand(pert.shape[0], device=pert.device) < self.p_drop_cond
        out = {"x0": x0, "x_ctrl": x_ctrl, "pert": pert, "ctx": ctx, "batch": batch, "drop_cond": drop}
        return out if ref is None else {**out, "ref": ref}

    def _get_generative_input(
        self, tensors: dict[str, torch.Tensor], inference_outputs: dict[str, torch.Tensor], **kwargs
    ) -> dict[str, torch.Tensor]:
        return dict(inference_outputs)

    @auto_move_data
    def generative(
        self,
        x0: torch.Tensor,
        x_ctrl: torch.Tensor,
        pert: torch.Tensor,
        ctx: torch.Tensor,
        batch: torch.Tensor,
        drop_cond: torch.Tensor,
        ref: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Noise each target set at its own timestep and predict it back (with self-conditioning). The reference
        ``ref`` is added in both the conditional and the dropped (classifier-free) passes."""
        t = torch.randint(0, self.diffusion.n_timesteps, (x0.shape[0],), device=x0.device)  # one t per set
        x_t = self.diffusion.q_sample(x0, t, torch.randn_like(x0))
        self_cond = None  # no estimate to feed back: the denoiser reads zeros
        if self.training and torch.rand(()) < self.p_self_cond:  # one coin per step, as released
            with torch.no_grad():
                self_cond = self._x0(self.denoiser, x_t, t, x_ctrl, pert, ctx, batch, None, drop_cond, ref=ref)
        x0_hat = self._x0(self.denoiser, x_t, t, x_ctrl, pert, ctx, batch, self_cond, drop_cond, ref=ref)
        return {"x0_hat": x0_hat, "t": t}

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict[str, torch.Tensor],
        generative_outputs: dict[str, torch.Tensor],
    ) -> LossOutput:
        """Per set: ``mse_weight * MSE + energy_weight * energy_distance / 2`` (geomloss ``energy``)."""
        x0 = inference_outputs["x0"]
        x0_hat = generative_outputs["x0_hat"]
        mse = per_set_mse(x0_hat, x0)  # (B,)
        energy = 0.5 * energy_distance(x0_hat, x0)  # (B,)
        weight = self.energy_weight
        if self.energy_weighting == "abar":
            weight = weight * self.diffusion.alphas_cumprod[generative_outputs["t"]].to(energy.dtype)
        per_set = self.mse_weight * mse + weight * energy
        return LossOutput(
            loss=per_set.mean(),
            reconstruction_loss=per_set,
            extra_metrics={"mse": mse.mean().detach(), "energy": energy.mean().detach()},
        )

    # ----------------------------------------------------------------- EMA
    @torch.no_grad()
    def update_ema(self) -> None:
        """One EMA step (call after each optimiser step); warm-up ``min(decay, (1 + n) / (10 + n))``."""
        n = int(self.ema_updates) + 1
        if n % self.ema_every == 0:
            decay = min(self.ema_decay, (1 + n / self.ema_every) / (10 + n / self.ema_every))
            # One multi-tensor call (public torch API; ema = decay * ema + (1 - decay) * p for every tensor at
            # once): a Ctrl+C cannot leave the EMA half-updated. The third argument (number averaged) is unused.
            ema_multi_avg = get_ema_multi_avg_fn(decay)
            ema_multi_avg(list(self.ema.parameters()), [p.detach() for p in self.denoiser.parameters()], n)
        self.ema_updates += 1  # counted after the update, so an interrupted update is not counted

    # ----------------------------------------------------------------- sampling
    @torch.inference_mode()
    def sample(
        self,
        x_ctrl: torch.Tensor,
        pert: torch.Tensor,
        ctx: torch.Tensor,
        batch: torch.Tensor,
        *,
        n_steps: int = DEFAULT_N_STEPS,
        sampler: Literal["ddim", "ddpm", "ddim_truncated"] = "ddim",
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        generator: torch.Generator | None = None,
        use_ema: bool = True,
        start_time: int | None = None,
        x0_max: torch.Tensor | float | None = None,
        step_callback: StepCallback | None = None,
        codes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Generate perturbed sets ``(B, S, G)`` (expression scale) for controls ``x_ctrl`` ``(B, S, G)``.

        ``pert`` holds registered perturbation codes ``(B,)`` or, with combinatorial perturbations,
        component codes ``(B, K)`` (``-1`` = padding), which also reach combinations never trained on.

        ``sampler`` and ``start_time`` are as in :func:`~perturbdiff_scvi.diffusion.sample_loop_progressive`
        (``"ddim_truncated"`` is the released sampler; ``n_steps`` does not apply to it). ``x0_max`` (expression
        units: a float or a per-gene ``(G,)`` tensor; ``None`` = no cap) caps each step's clean estimate, so the
        output lies in ``[0, x0_max]``. ``step_callback(t, x_t, x0)`` sees every step's state and estimate in
        expression units (multiplied back by ``input_scale``), e.g. a
        :class:`~perturbdiff_scvi.diffusion.RangeMonitor`. The defaults (``n_steps``, ``guidance_scale``) are those
        of :meth:`~perturbdiff_scvi.model.PerturbDiff.predict_population`
        (:data:`~perturbdiff_scvi.diffusion.DEFAULT_N_STEPS`,
        :data:`~perturbdiff_scvi.diffusion.DEFAULT_GUIDANCE_SCALE`). ``codes``: the registered perturbation codes
        ``(B,)`` (``-1``: never registered) that pick the reference responses of ``reference_shift``; ``None`` =
        ``pert`` when it holds registered codes, else no reference.
        """
        net = self.ema if use_ema else self.denoiser
        device = next(net.parameters()).device
        x_ctrl = x_ctrl.to(device) / self.input_scale
        pert, ctx, batch = pert.to(device), ctx.to(device), batch.to(device)
        if codes is None and pert.dim() == 1:
            codes = pert
        ref = None if codes is None else self.reference(codes, ctx)
        if self.perturbation_components is not None and pert.dim() == 1:
            pert = self.perturbation_components[pert]
        keep = torch.zeros(x_ctrl.shape[0], dtype=torch.bool, device=device)

        def denoise(x_t, t, self_cond, drop: bool):
            return self._x0(net, x_t, t, x_ctrl, pert, ctx, batch, self_cond, keep | drop, ref=ref)

        extra = {}
        if start_time is not None:
            extra["start_time"] = start_time
        if x0_max is not None:
            x0_max = torch.as_tensor(x0_max, dtype=x_ctrl.dtype, device=device)
            extra["x0_max"] = x0_max / self.input_scale  # model space
        if step_callback is not None:
            scale = self.input_scale
            extra["step_callback"] = lambda t, x_t, x0: step_callback(t, x_t * scale, x0 * scale)
        x0 = sample_loop(
            denoise,
            self.diffusion,
            tuple(x_ctrl.shape),
            n_steps=n_steps,
            sampler=sampler,
            guidance_scale=guidance_scale,
            generator=generator,
            device=device,
            **extra,
        )
        out = x0 * self.input_scale
        return out if x0_max is None else torch.minimum(out, x0_max)  # exact in expression units
