"""Grouped options: the research settings of the constructor and the sampler / output details of prediction.

The user's few choices stay keywords of :class:`~perturbdiff_scvi.PerturbDiff` (sizes) and of
:meth:`~perturbdiff_scvi.PerturbDiff.predict_population` (what, where, how many, seed, guidance, steps); the rest
lives in these frozen option objects. The flat keywords of 0.1.0 still work for one release, with a
``FutureWarning`` (:func:`split_deprecated`).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Literal

from scvi import settings


@dataclass(frozen=True, kw_only=True)
class DiffusionOptions:
    """Research options of :class:`~perturbdiff_scvi.PerturbDiff`: the diffusion, the loss and the EMA.

    The defaults are the measured small-data defaults; :data:`~perturbdiff_scvi.model.PAPER_CONFIG` holds the
    released values where they differ.

    Parameters
    ----------
    mlp_ratio
        MLP expansion in each block.
    n_cov_hidden
        Width between concatenated covariates and the class embedding; ``None`` = number of genes, as released.
    n_timesteps
        Diffusion steps ``T``.
    beta_schedule
        ``"linear"`` (released, 1e-4 to 0.02) or ``"cosine"``.
    input_scale
        Expression is divided by this for diffusion. The released runs use 10 (``normalize_counts``); 1 trains
        far better in short CPU runs and is the default here. ``"auto"`` (not in the released method): the root
        mean square of the non-zero registered training values, so that an expressed value has about unit size in
        diffusion space (bundled Kang: about 1.08; a dense panel normalised to 1e4: about 3.8). The resolved float
        is what the module uses and what :meth:`~perturbdiff_scvi.PerturbDiff.save` stores.
    energy_weight
        Weight of the set energy term in the loss (1 as released; 0 gives a per-cell MSE-only model).
    mse_weight
        Weight of the per-cell MSE term.
    energy_weighting
        ``"constant"`` (released): the energy term weighs the same at every timestep. ``"abar"`` (not in the
        released method): weighted by ``abar_t`` of each set's timestep (1 at low noise, 0 at pure noise).
    preconditioning
        ``"none"`` (released): the denoiser's output is the clean estimate ``x0``. ``"edm"`` (not in the released
        method; Karras et al. 2022 in variance-preserving form): ``x0 = relu(c_skip(t) x_t / sqrt(abar_t) +
        c_out(t) F)``.
    sigma_data
        With ``preconditioning="edm"``: the standard deviation of the data in diffusion units; ``"auto"`` = that of
        all registered training values divided by ``input_scale`` (stored resolved). Not used otherwise.
    p_drop_cond
        Probability of training a set with the null covariate embedding (classifier-free guidance). Released: 0.5;
        0.2 trains the conditional model on more sets, which short runs need.
    p_self_cond
        Probability of the self-conditioning pass at a training step.
    ema_decay
        Decay of the exponential moving average of the weights used for prediction.
    ema_every
        Optimiser steps between EMA updates (10 in the paper's 200k-step runs; 1 here for short runs).
    context_embedding
        ``True`` (released): the context is embedded with the perturbation and the batch. ``False`` (not in the
        released method): it is left out of the covariates, so the denoiser learns the context only from the
        matched control cells it is given, as a model that maps control cells (CellFlow) does; a held-out
        context then differs from the training ones only in its cells, not in an embedding trained on its
        control sets alone.
    control_skip
        ``False`` (released): the denoiser's output is the clean estimate ``x0``. ``True`` (not in the released
        method): it is the change from the control cell its token is paired with, ``x0_i = relu(x_ctrl_i + F_i)``,
        so that a cell starts from a real control cell and the network learns only the response, as a flow from
        the control cells (CellFlow) does. Control and perturbed cells stay unpaired in training (a random
        index pairing of the two sets); needs ``preconditioning="none"``.
    reference_shift
        ``False`` (released). ``True`` (not in the released method): the denoiser's output is added to a reference
        response, ``x0 = relu(F + r(p, c))``, so that the network learns only how the response of perturbation
        ``p`` in context ``c`` differs from it. ``r(p, c)`` is the mean response of ``p`` in the *other* training
        contexts, each weighted by how close its control cells are to ``c``'s (``exp(-(d / d_min)^2)``, the kernel
        of ``guidance_scale="auto"``), so a held-out context starts from the response of the contexts it resembles,
        as a flow on control cells (CellFlow) inherits it. Training sets get the same leave-their-context-out
        reference as a held-out context gets at prediction. It is 0 for the control, for a perturbation measured in
        no other context (e.g. a single-context dataset, or an unseen combination), and it needs
        ``preconditioning="none"`` and ``control_skip=False``.

    Examples
    --------
    >>> from perturbdiff_scvi.model import DiffusionOptions
    >>> model = PerturbDiff(train, n_hidden=256, options=DiffusionOptions(input_scale="auto", p_drop_cond=0.5))
    """

    mlp_ratio: float = 4.0
    n_cov_hidden: int | None = None
    n_timesteps: int = 1000
    beta_schedule: Literal["linear", "cosine"] = "linear"
    input_scale: float | Literal["auto"] = 1.0
    energy_weight: float = 1.0
    mse_weight: float = 1.0
    energy_weighting: Literal["constant", "abar"] = "constant"
    preconditioning: Literal["none", "edm"] = "none"
    sigma_data: float | Literal["auto"] = "auto"
    p_drop_cond: float = 0.2
    p_self_cond: float = 0.5
    ema_decay: float = 0.99
    ema_every: int = 1
    context_embedding: bool = True
    control_skip: bool = False
    reference_shift: bool = False


@dataclass(frozen=True, kw_only=True)
class SamplerOptions:
    """How :meth:`~perturbdiff_scvi.PerturbDiff.predict_population` runs the reverse chain.

    Parameters
    ----------
    sampler
        ``"ddim"`` (deterministic, eta = 0, the default), ``"ddpm"`` (ancestral), or ``"ddim_truncated"``: the
        sampler of the official release, DDIM eta = 0 over ``t = start_time - 1, ..., 0`` one step at a time,
        starting from pure noise placed at ``t = start_time - 1``. With the released ``start_time=100`` of
        T = 1000 this runs only the last 100 timesteps, not a 100-step DDIM over the whole range.
    start_time
        Only for ``sampler="ddim_truncated"``: its first timestep + 1, from 1 to ``n_timesteps``; ``None`` = the
        released 100 (or ``n_timesteps`` if smaller). Giving it with another sampler raises a ``ValueError``.
    batch_size
        Sets per forward pass.
    use_ema
        Use the EMA weights (as released) rather than the raw weights.
    progress_bar
        Show scvi-tools' progress bar over the forward passes when there are at least two.

    Examples
    --------
    >>> from perturbdiff_scvi.model import SamplerOptions
    >>> released = model.predict_population("stimulated", contexts="CD4T", guidance_scale=1.0, seed=0,
    ...                                     sampler_options=SamplerOptions(sampler="ddim_truncated", start_time=100))
    """

    sampler: Literal["ddim", "ddpm", "ddim_truncated"] = "ddim"
    start_time: int | None = None
    batch_size: int = 16
    use_ema: bool = True
    progress_bar: bool = True


@dataclass(frozen=True, kw_only=True)
class OutputOptions:
    """What :meth:`~perturbdiff_scvi.PerturbDiff.predict_population` does to the generated cells.

    Applied in this order: ``x0_bound`` (at every reverse step), ``bias_correction``, ``shift_pcs``,
    ``zero_threshold``, ``transport``, ``counts``.

    Parameters
    ----------
    x0_bound
        Cap the clean estimate ``x0`` at every reverse step (and so the output) to ``[0, x0_bound]``, in
        expression units: ``"auto"`` (default) = 1.5 x each gene's maximum in the registered training matrix, a
        number = one cap for every gene, ``None`` = no cap (values only >= 0, as released). Measured on four
        tasks and three seeds, ``"auto"`` changes no accuracy or realism metric beyond seed noise and keeps dense
        high-valued panels in range (benchmarks/HISTORY.md, "Values in range").
    zero_threshold
        Set predicted values below this to exactly 0, for a realistic zero pattern before differential expression.
        ``"auto"`` = the 1 % quantile of the non-zero registered training values
        (:func:`~perturbdiff_scvi.metrics.realistic_zero_threshold`); ``None`` (default) keeps the released output.
    bias_correction
        Not in the released method. Also generate the *control* population from the same control draws and
        subtract, per gene, its mean error against those control cells (``x' = max(0, x - error)``). Doubles the
        sampling time; needs a model trained with ``train_on_controls=True`` (the default).
    shift_pcs
        Not in the released method. ``None`` (default): the generated cells. A number ``k``: each population's
        mean shift from the mean of its (context, batch) control cells is kept only along the top ``k`` principal
        axes of the training cells (``V``, fitted once per model on at most 20,000 of them), and every cell keeps
        its deviation from the population mean: ``x' = max(0, x - (I - V V^T) delta)``. This removes the model's
        per-gene error from the mean of genes the perturbation hardly moves, as a model on PCs (CellFlow) does by
        construction; measured on the seven Kang folds and four other tasks with ``k = 50`` (docs,
        "PerturbDiff against CellFlow, STATE and scGen").
    pcs_anchor
        With ``shift_pcs``: where the projected shift is measured from. ``"controls"`` (default): the mean of the
        population's (context, batch) control cells, as above. ``"training"``: the mean ``mu`` of the training cells
        (the centre of the PCA), ``x' = max(0, x - (I - V V^T) (mean(x) - mu))``: the population mean is put on
        the affine span of the axes, as a model decoding from the training PCs does, so the part of the held-out
        context's control mean outside the axes is not carried into the prediction. On the seven Kang folds (three
        seeds, ``reference_shift=True``, guidance 0) it gave pd top-100 0.947 against 0.941 and pd all 0.906
        against 0.898.
    transport
        Not in the released method. ``"none"`` (default): the generated cells. ``"quantile"``: for each population,
        ``n`` distinct control cells of its (context, batch), each moved gene by gene onto the generated
        population's distribution of that gene (one-dimensional optimal transport per gene). Means, shifts and DE
        are unchanged; the joint structure comes from real control cells.
    counts
        Also sample counts: cell ``i`` of each set gets the library size of control cell ``i`` of its control draw
        and ``counts ~ Multinomial(library, expm1(x) / sum expm1(x))``; returned in ``layers["counts"]``, with
        ``X`` re-normalised from them. Needs raw counts of the control cells (``counts_layer``).
    counts_layer
        With ``counts=True``: the layer of the registered AnnData (its RNA modality for MuData), or of
        ``control_adata``, that holds raw counts of the control cells.

    Examples
    --------
    >>> from perturbdiff_scvi.model import OutputOptions
    >>> pred = model.predict_population("stimulated", contexts="CD4T", seed=0,
    ...                                 output_options=OutputOptions(counts=True, zero_threshold="auto"))
    >>> pred.layers["counts"]
    """

    x0_bound: float | Literal["auto"] | None = "auto"
    zero_threshold: float | Literal["auto"] | None = None
    bias_correction: bool = False
    shift_pcs: int | None = None
    pcs_anchor: Literal["controls", "training"] = "controls"
    transport: Literal["none", "quantile"] = "none"
    counts: bool = False
    counts_layer: str = "counts"


#: Options removed in 0.2.0 after measuring them on three seeds (see the CHANGELOG), and what to do instead.
REMOVED_OPTIONS = {
    "energy_pcs": "removed in 0.2.0 (measured on three seeds: C2ST unchanged, pearson_delta 0.12 lower).",
    "pairing": "removed in 0.2.0 (OT pairing measured on three seeds did not help); cells are paired as drawn.",
    "p_high_noise": "removed in 0.2.0 (measured on three seeds: no gain); timesteps are drawn uniformly.",
    "init": "removed in 0.2.0 (starting from the noised controls, SDEdit, measured no gain); the chain starts "
    "from pure noise.",
}


def field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def options_from(cls, value, argument: str):
    """``value`` as an instance of the option class ``cls``: ``None`` = defaults; a dict of its fields is accepted."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(field_names(cls)))
        if unknown:
            raise ValueError(f"{argument} has no option(s) {unknown}; the options are {list(field_names(cls))}.")
        return cls(**value)
    raise TypeError(f"{argument} must be a {cls.__name__} (or None); got {type(value).__name__}.")


def split_deprecated(
    flat: dict, groups: dict[str, tuple[type, object]], *, where: str, removed: dict[str, str] | None = None
) -> dict[str, object]:
    """Fold the flat keywords of 0.1.0 into their option objects, with one ``FutureWarning``.

    ``groups`` maps an option argument's name to ``(option class, the value given for it)``; the result maps the
    same names to option instances. A keyword given both flat and in its option object raises a ``ValueError``;
    one that belongs to no group raises a ``TypeError`` like Python's own; ``removed`` maps removed keywords to
    what to do instead.
    """
    out = {name: options_from(cls, value, name) for name, (cls, value) in groups.items()}
    if not flat:
        return out
    for key in flat:
        if removed and key in removed:
            raise TypeError(f"{where} no longer takes {key}=: {removed[key]}")
    owner = {f: name for name, (cls, _) in groups.items() for f in field_names(cls)}
    unknown = [k for k in flat if k not in owner]
    if unknown:
        raise TypeError(f"{where} got unexpected keyword argument(s) {unknown}.")
    moved: dict[str, dict] = {}
    for key, value in flat.items():
        moved.setdefault(owner[key], {})[key] = value
    hints = []
    for name, values in moved.items():
        cls, given = groups[name]
        if given is not None:
            raise ValueError(
                f"{where}: {sorted(values)} given both as keywords and through {name}=; set them in {name} only."
            )
        out[name] = dataclasses.replace(out[name], **values)
        hints.append(f"{name}={cls.__name__}({', '.join(f'{k}=...' for k in values)})")
    warnings.warn(
        f"{where}: the keyword(s) {list(flat)} are deprecated and will be removed in the next release; pass "
        + " and ".join(hints)
        + " instead.",
        FutureWarning,
        stacklevel=settings.warnings_stacklevel + 1,
    )
    return out
