"""PerturbDiff: the user-facing scvi-tools model. Thin: each job lives in its own room of this package.

- presets and defaults: ``_presets.py``; registration checks and fields: ``_setup.py``;
- training schedule and Ctrl+C recovery: ``_train.py``; the optimisation: ``_training_plan.py``;
- atomic save and validated load: ``_io.py``;
- prediction (conditions, ``Job`` plan, sampling, assembly): ``_predict.py``; control cells: ``_controls.py``;
- embeddings of perturbations, contexts and populations (``get_*_embedding``): ``_embeddings.py``.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import rich.pretty  # noqa: F401  (scvi 1.4.2 + rich>=15: view_anndata_setup needs it imported)
import torch
from anndata import AnnData
from scvi import settings
from scvi.data import AnnDataManager
from scvi.model.base import BaseModelClass
from scvi.train import TrainRunner
from scvi.utils import setup_anndata_dsp

from .._combinations import PerturbationVocabulary
from .._compat import devices_dsp
from .._constants import PDIFF_KEYS
from .._perturbation_features import FeatureVocabulary, check_perturbation_features
from .._validation import find_category, optional_seed
from ..data import SetDataSplitter
from ..module import PerturbDiffModule
from . import _io, _predict, _ranges, _setup, _train
from ._embeddings import EmbeddingMixin
from ._presets import DEFAULT_GUIDANCE_SCALE, check_hyperparameters
from ._training_plan import DiffusionTrainingPlan

if TYPE_CHECKING:
    from mudata import MuData

logger = logging.getLogger(__name__)


class PerturbDiff(EmbeddingMixin, BaseModelClass):
    """PerturbDiff: functional diffusion over cell populations :cite:p:`Yuan2026`.

    A population of cells of one (perturbation, context, batch) is generated jointly as a set of
    ``set_size`` cells by a permutation-equivariant transformer, conditioned on a matched set of
    control cells and on the covariates. Training minimises per-cell MSE plus the energy distance
    between predicted and true sets; sampling is DDIM with classifier-free guidance.

    Parameters
    ----------
    adata
        AnnData (or MuData) registered with :meth:`setup_anndata` / :meth:`setup_mudata`.
    set_size
        Cells per set ``S`` (256 in the paper; 64 here to train on a CPU).
    n_hidden
        Token width ``H`` of the denoiser.
    depth
        Number of joint-attention blocks.
    n_heads
        Attention heads (the attention runs at width ``2 * n_hidden``).
    mlp_ratio
        MLP expansion in each block.
    n_cov
        Width of each covariate embedding (perturbation, context, batch).
    n_cov_hidden
        Width between concatenated covariates and the class embedding; ``None`` = number of genes, as released.
    n_timesteps
        Diffusion steps ``T``.
    beta_schedule
        ``"linear"`` (released, 1e-4 to 0.02) or ``"cosine"``.
    input_scale
        Expression is divided by this for diffusion. The released runs use 10 (``normalize_counts``); 1 trains
        far better in short CPU runs (see the README) and is the default here; ``PAPER_CONFIG`` uses 10.
        ``"auto"`` (not in the released method) derives it from the registered training matrix: the root mean
        square of its non-zero values, so that an expressed value has about unit size in diffusion space, like
        the unit-variance noise, whether the data are sparse and low (bundled Kang: 95 % zeros, max 6.8 ->
        about 1.08) or dense and high (Kang's 300 most expressed genes re-normalised to 1e4: max 8.8 -> about
        3.8). The resolved float is what the module uses and what :meth:`save` stores (``model.module.input_scale``);
        loading never recomputes it.
    energy_weight
        Weight of the set energy term in the loss (1 as released; 0 gives a per-cell MSE-only model).
    mse_weight
        Weight of the per-cell MSE term.
    energy_weighting
        ``"constant"`` (released): the energy term weighs the same at every timestep. ``"abar"`` (not in the
        released method): it is weighted by ``abar_t`` of each set's timestep (1 at low noise, 0 at pure noise).
        At high noise the best ``x0`` estimate is a conditional mean; an energy term there trains the estimate
        to be a diverse sample instead, which the DDIM update then adds on top of the state's own spread.
    energy_pcs
        ``0`` (released): the energy term compares the predicted and true sets over all genes. ``k > 0`` (not in
        the released method): over their coordinates on the top ``k`` principal axes of the registered training
        cells (fitted once here on up to 10,000 cells and stored with the model). Over thousands of genes the
        distances between cells are dominated by gene-level noise; on the principal axes the term weighs the
        shape of the population along the axes that separate cell states (see ``benchmarks/README.md``).
    preconditioning
        ``"none"`` (released): the denoiser's output is the clean estimate ``x0``. ``"edm"`` (not in the released
        method; Karras et al. 2022 in variance-preserving form): ``x0 = relu(c_skip(t) x_t / sqrt(abar_t) +
        c_out(t) F)``, a skip connection that passes the state through at low noise (``c_skip -> 1``) and leaves
        the network the whole estimate at high noise. ``"edm_shrink"``: the same with a learned per-gene soft
        threshold on the skip path, so that genes that are zero stay zero instead of carrying the residual noise
        into the output (sparse data); see :class:`~perturbdiff_scvi.module.PerturbDiffModule`.
    sigma_data
        With ``preconditioning="edm"`` or ``"edm_shrink"``: the standard deviation of the data in diffusion
        units; ``"auto"`` = the standard deviation of all registered training values divided by ``input_scale``
        (stored resolved). Not used otherwise.
    pairing
        Which target cell each control cell's token is compared with in the per-cell MSE. ``"random"``
        (released): as drawn (perturbed and control cells are unpaired). ``"ot"`` (not in the released method):
        the target cells of each set are first reordered by the optimal one-to-one assignment to its control
        cells (mini-batch optimal transport, squared Euclidean cost).
    p_high_noise
        Share of training sets whose timestep is drawn from the top tenth of the schedule instead of uniformly
        (0 as released), where the default one-step sampler evaluates the denoiser.
    p_drop_cond
        Probability of training a set with the null covariate embedding (classifier-free guidance). The
        released runs use 0.5; 0.2 trains the conditional model on more sets, which short runs need (see the
        README); ``PAPER_CONFIG`` uses 0.5.
    p_self_cond
        Probability of the self-conditioning pass at a training step.
    ema_decay
        Decay of the exponential moving average of the weights used for prediction.
    ema_every
        Optimiser steps between EMA updates (10 in the paper's 200k-step runs; 1 here for short runs).

    Examples
    --------
    >>> import perturbdiff_scvi as pdiff
    >>> adata = pdiff.datasets.kang2018()
    >>> train = adata[~((adata.obs.cell_type == "CD4T") & (adata.obs.condition == "stimulated"))].copy()
    >>> pdiff.PerturbDiff.setup_anndata(train, perturbation_key="condition", control_value="control",
    ...                                 context_key="cell_type")
    >>> model = pdiff.PerturbDiff(train)
    >>> model.train(max_steps=1500)
    >>> pred = model.predict_population("stimulated", contexts="CD4T", seed=0)
    """

    _module_cls = PerturbDiffModule
    _data_splitter_cls = SetDataSplitter
    _training_plan_cls = DiffusionTrainingPlan
    _train_runner_cls = TrainRunner

    def __init__(
        self,
        adata: AnnData | MuData | None = None,
        *,
        set_size: int = 64,
        n_hidden: int = 128,
        depth: int = 2,
        n_heads: int = 4,
        mlp_ratio: float = 4.0,
        n_cov: int = 64,
        n_cov_hidden: int | None = None,
        n_timesteps: int = 1000,
        beta_schedule: Literal["linear", "cosine"] = "linear",
        input_scale: float | Literal["auto"] = 1.0,
        energy_weight: float = 1.0,
        mse_weight: float = 1.0,
        energy_weighting: Literal["constant", "abar"] = "constant",
        energy_pcs: int = 0,
        preconditioning: Literal["none", "edm", "edm_shrink"] = "none",
        sigma_data: float | Literal["auto"] = "auto",
        pairing: Literal["random", "ot"] = "random",
        p_high_noise: float = 0.0,
        p_drop_cond: float = 0.2,
        p_self_cond: float = 0.5,
        ema_decay: float = 0.99,
        ema_every: int = 1,
    ):
        super().__init__(adata)
        # resolved before init_params_ records the arguments, so that save / load keep the float
        input_scale = _ranges.input_scale_value(
            input_scale, lambda: self.adata_manager.get_from_registry(PDIFF_KEYS.X_KEY)
        )
        # resolved and stored as a float with an EDM preconditioning; unused (1.0) otherwise. An invalid value
        # reads no data: check_hyperparameters below rejects it.
        if preconditioning in ("edm", "edm_shrink"):
            sigma_data = _ranges.sigma_data_value(
                sigma_data, input_scale, lambda: self.adata_manager.get_from_registry(PDIFF_KEYS.X_KEY)
            )
        elif isinstance(sigma_data, str):
            sigma_data = 1.0
        hparams = check_hyperparameters(
            set_size=set_size, n_hidden=n_hidden, depth=depth, n_heads=n_heads, mlp_ratio=mlp_ratio, n_cov=n_cov,
            n_cov_hidden=n_cov_hidden, n_timesteps=n_timesteps, beta_schedule=beta_schedule, input_scale=input_scale,
            energy_weight=energy_weight, mse_weight=mse_weight, energy_weighting=energy_weighting,
            energy_pcs=energy_pcs, preconditioning=preconditioning, sigma_data=sigma_data, pairing=pairing,
            p_high_noise=p_high_noise, p_drop_cond=p_drop_cond, p_self_cond=p_self_cond, ema_decay=ema_decay,
            ema_every=ema_every,
        )  # fmt: skip
        ss = self.summary_stats
        vocab = self._vocabulary
        self.module = self._module_cls(
            n_genes=ss.n_vars,
            n_perturbations=ss[f"n_{PDIFF_KEYS.PERT_KEY}"] if vocab is None else len(vocab.components),
            n_contexts=ss[f"n_{PDIFF_KEYS.CONTEXT_KEY}"],
            n_batches=ss[f"n_{PDIFF_KEYS.BATCH_KEY}"],
            perturbation_components=None if vocab is None else torch.from_numpy(vocab.matrix),
            perturbation_features=(
                torch.from_numpy(vocab.features.to_numpy()) if isinstance(vocab, FeatureVocabulary) else None
            ),
            **hparams,
        )
        if self.module.energy_pcs:  # filled here, stored in the state_dict (loading does not refit it)
            axes = _ranges.principal_axes(self.adata_manager.get_from_registry(PDIFF_KEYS.X_KEY), hparams["energy_pcs"])
            self.module.energy_basis.copy_(torch.from_numpy(axes))
        n_params = sum(p.numel() for p in self.module.denoiser.parameters())
        self._model_summary_string = (
            f"PerturbDiff: {ss.n_vars} genes, set_size={set_size}, n_hidden={n_hidden}, depth={depth}, "
            f"n_heads={n_heads}, T={n_timesteps}, {n_params / 1e6:.2f}M parameters"
            + ("" if vocab is None else f", {len(vocab.components)} perturbation components")
            + (f" from {vocab.features.shape[1]} features" if isinstance(vocab, FeatureVocabulary) else "")
        )
        self.init_params_ = self._get_init_params(locals())

    @classmethod
    @setup_anndata_dsp.dedent
    def setup_anndata(
        cls,
        adata: AnnData,
        perturbation_key: str,
        control_value: str,
        context_key: str | None = None,
        batch_key: str | None = None,
        layer: str | None = None,
        *,
        combination_delimiter: str | None = None,
        perturbation_features: pd.DataFrame | None = None,
        **kwargs,
    ) -> None:
        """%(summary)s.

        Expression must be log1p of library-size-normalised values (e.g. ``sc.pp.normalize_total`` then
        ``sc.pp.log1p``); raw counts, negative, NaN or infinite values raise a ``ValueError``. Setup adds
        only scvi-tools' registration columns (``_scvi_*`` in ``obs``, ``_scvi_*`` in ``uns``).

        Control matching: each perturbed set is paired with control cells of the same (context, batch).
        Where that pool is empty, controls come from the same context in other batches, then from the
        same batch in other contexts, then from all controls (with a warning at training).

        Parameters
        ----------
        %(param_adata)s
        perturbation_key
            Column of ``adata.obs`` with the perturbation of each cell (drug, cytokine, guide, ...).
        control_value
            Value of ``perturbation_key`` that marks control (unperturbed) cells.
        context_key
            Column of ``adata.obs`` with the cell type / cell line; ``None`` = one context.
        batch_key
            Column of ``adata.obs`` with the batch / donor / plate; ``None`` = one batch.
        %(param_layer)s
        combination_delimiter
            Set to e.g. ``"+"`` when ``perturbation_key`` holds combinations such as ``"KLF1+MAP2K6"``: each
            label is then split into components, and a perturbation is embedded as the sum of its
            components' embeddings (the control has none). This lets ``predict_population`` generate a
            combination never measured, from components seen in training (alone or in other combinations).
            ``None`` (default): one embedding per label, as in the released model.
        perturbation_features
            Not in the released method. A DataFrame indexed by perturbation name (by component name with
            ``combination_delimiter``), one numeric column per feature (e.g. an embedding of the targeted gene,
            or :func:`~perturbdiff_scvi.tl.coexpression_features`). The perturbation embedding is then
            a small MLP of the (standardised) features instead of a lookup table
            (:class:`~perturbdiff_scvi.nn.FeatureEncoder`; the control gets 0, a combination the sum of its
            components' encodings), so ``predict_population`` can generate a perturbation **never seen in
            training** whose row is in this table: give the table rows for the perturbations you want to predict
            too. Every perturbation (component) of the training cells needs a row; rows must be unique, numeric
            and finite. The table is stored with the setup arguments, so :meth:`save` / :meth:`load` keep it.
            ``None`` (default): the lookup table, unchanged.

        Examples
        --------
        >>> PerturbDiff.setup_anndata(adata, perturbation_key="condition", control_value="control",
        ...                           context_key="cell_type")
        >>> PerturbDiff.setup_anndata(screen, perturbation_key="gene", control_value="control",
        ...                           perturbation_features=gene_features)  # rows: genes, also unseen ones
        >>> PerturbDiff.setup_anndata(norman, perturbation_key="perturbation", control_value="control",
        ...                           combination_delimiter="+")
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        if not isinstance(adata, AnnData):
            raise TypeError(
                f"setup_anndata expects an AnnData, got {type(adata).__name__}; use setup_mudata for MuData."
            )
        keys = {"perturbation_key": perturbation_key, "context_key": context_key, "batch_key": batch_key}
        _setup.check_setup_inputs(
            adata,
            obs=adata.obs,
            layer=layer,
            control_value=control_value,
            combination_delimiter=combination_delimiter,
            **keys,
        )
        setup_method_args["setup_args"]["perturbation_features"] = check_perturbation_features(
            perturbation_features,
            pd.unique(adata.obs[perturbation_key].astype(str)),
            combination_delimiter,
            control_value,
            perturbation_key,
        )  # stored checked (float32, string index), so the saved model replays the same table
        adata_manager = AnnDataManager(
            fields=_setup.anndata_fields(layer, perturbation_key, context_key, batch_key),
            setup_method_args=setup_method_args,
        )
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    @classmethod
    @setup_anndata_dsp.dedent
    def setup_mudata(
        cls,
        mdata: MuData,
        rna_layer: str | None = None,
        perturbation_key: str | None = None,
        control_value: str | None = None,
        context_key: str | None = None,
        batch_key: str | None = None,
        modalities: dict[str, str] | None = None,
        *,
        combination_delimiter: str | None = None,
        **kwargs,
    ) -> None:
        """Register a MuData whose RNA modality is modelled.

        Obs columns are read from ``mdata.obs`` when present there, otherwise from the RNA modality's
        ``obs``. Every cell of ``mdata`` must have RNA.

        Parameters
        ----------
        mdata
            MuData object.
        rna_layer
            Layer of the RNA modality with log-normalised expression; ``None`` = its ``X``.
        perturbation_key, control_value, context_key, batch_key, combination_delimiter
            As in :meth:`setup_anndata`.
        modalities
            ``{"rna_layer": <name of the RNA modality>}`` (scvi-tools' convention; ``{"rna": <name>}`` is accepted
            too); defaults to ``{"rna_layer": "rna"}``.

        Examples
        --------
        >>> PerturbDiff.setup_mudata(mdata, perturbation_key="condition", control_value="control",
        ...                          context_key="cell_type", modalities={"rna_layer": "rna"})
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        from mudata import MuData

        if not isinstance(mdata, MuData):
            raise TypeError(f"setup_mudata expects a MuData, got {type(mdata).__name__}.")
        if perturbation_key is None or control_value is None:
            raise ValueError("setup_mudata needs perturbation_key and control_value.")
        rna_mod = _setup.rna_modality(mdata, modalities)
        merged, where = _setup.merged_mudata_obs(mdata, rna_mod, (perturbation_key, context_key, batch_key))
        keys = {"perturbation_key": perturbation_key, "context_key": context_key, "batch_key": batch_key}
        _setup.check_setup_inputs(
            mdata.mod[rna_mod],
            obs=merged,
            layer=rna_layer,
            control_value=control_value,
            combination_delimiter=combination_delimiter,
            name=f"mdata[{rna_mod!r}]",
            **keys,
        )
        adata_manager = AnnDataManager(
            fields=_setup.mudata_fields(rna_layer, rna_mod, where, perturbation_key, context_key, batch_key),
            setup_method_args=setup_method_args,
        )
        adata_manager.register_fields(mdata, **kwargs)
        cls.register_manager(adata_manager)

    # ------------------------------------------------------------------ registry
    def _mapping(self, key: str) -> np.ndarray:
        return self.adata_manager.get_state_registry(key).categorical_mapping

    @property
    def _control_code(self) -> int:
        return find_category(
            self._mapping(PDIFF_KEYS.PERT_KEY),
            self._setup_arg("control_value"),
            "control value",
            self._setup_arg("perturbation_key"),
        )

    @property
    def _vocabulary(self) -> PerturbationVocabulary | None:
        """Components of the perturbation labels: with ``perturbation_features``, the rows of that table; else, when
        set up with ``combination_delimiter``, the split labels; else ``None`` (one embedding per label)."""
        delimiter = self._setup_arg("combination_delimiter")
        features = self._setup_arg("perturbation_features")
        if features is not None:
            labels = self._mapping(PDIFF_KEYS.PERT_KEY)
            return FeatureVocabulary(labels, features, delimiter, self._setup_arg("control_value"))
        if delimiter is None:
            return None
        return PerturbationVocabulary(self._mapping(PDIFF_KEYS.PERT_KEY), delimiter, self._setup_arg("control_value"))

    def _training_statistic(self, name: Literal["gene_max", "zero_threshold"]):
        """A statistic of the registered training matrix, computed on first use and kept for this model object.

        ``"gene_max"``: per-gene maximum ``(G,)`` (``x0_bound="auto"``, the count sampler's cap);
        ``"zero_threshold"``: :func:`~perturbdiff_scvi.metrics.realistic_zero_threshold` (``zero_threshold="auto"``).
        Each is one pass over the matrix (a full read for backed AnnData), so repeated ``predict_population``
        calls pay it once. Not saved: a loaded model recomputes it from the AnnData it is loaded with.
        """
        cache = self.__dict__.setdefault("_training_statistics", {})
        if name not in cache:
            if name == "gene_max":
                compute = _ranges.gene_max
            elif name == "zero_threshold":
                from ..metrics import realistic_zero_threshold as compute  # lazy: keeps metrics off import
            else:
                raise ValueError(f"unknown training statistic {name!r}")
            cache[name] = compute(self.adata_manager.get_from_registry(PDIFF_KEYS.X_KEY))
        return cache[name]

    @property
    def var_names(self) -> pd.Index:
        """Genes the model was trained on, in order."""
        return pd.Index(self.adata_manager.get_state_registry(PDIFF_KEYS.X_KEY).column_names)

    def _setup_arg(self, name: str):
        """A setup argument, ``None`` when that setup method has no such argument (e.g. ``rna_layer`` for AnnData).

        scvi-tools' :meth:`~scvi.model.base.BaseModelClass.get_setup_arg` (inherited unchanged) raises a
        ``KeyError`` instead.
        """
        return self.adata_manager.registry["setup_args"].get(name)

    # ------------------------------------------------------------------ training
    @devices_dsp.dedent
    def train(
        self,
        max_epochs: int | None = None,
        max_steps: int | None = None,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        sets_per_batch: int = 8,
        lr: float = 1e-3,
        early_stopping: bool = False,
        validation_size: float = 0.1,
        split: Literal["set", "cell", "group"] = "set",
        train_on_controls: bool = True,
        check_val_every_n_epoch: int | None = None,
        plan_kwargs: dict | None = None,
        datasplitter_kwargs: dict | None = None,
        batch_size: int | None = None,
        compile: bool = False,
        compile_kwargs: dict | None = None,
        **trainer_kwargs,
    ):
        """Train the model with Lightning through scvi-tools' ``TrainRunner``.

        Parameters
        ----------
        max_epochs
            Epochs; one epoch serves every training cell once in sets of ``set_size`` (groups padded).
        max_steps
            Optimisation steps; if neither is given, ``DEFAULT_MAX_STEPS`` (1500) steps. With several processes
            (``devices=2, strategy="ddp_spawn"``, ...) these are steps in total, each on ``sets_per_batch`` sets per
            process; the processes serve disjoint shards of the sets of each epoch, each with its own random
            stream derived from the seed.
        %(param_accelerator)s
        %(param_devices)s
        sets_per_batch
            Cell **sets** per optimisation step (each set holds ``set_size`` cells plus as many matched controls,
            so a step sees ``2 * sets_per_batch * set_size`` cells).
        lr
            Peak learning rate of AdamW (warm-up, plateau, cosine decay to a tenth).
        early_stopping
            Stop when ``validation_loss`` stops improving (needs ``validation_size > 0``).
        validation_size
            Share of sets held out for validation (see ``split``).
        split
            Unit of the held-out share: ``"set"`` (blocks of ``set_size`` cells of each group), ``"cell"``
            (cells of each group) or ``"group"`` (whole (perturbation, context, batch) groups). Training and
            validation sets never share a cell.
        train_on_controls
            Also learn to generate control sets (the released ``keep_control_cell``); this trains the
            context embedding of contexts whose perturbed cells are all held out.
        check_val_every_n_epoch
            Validation frequency; by default about every 50 steps when a validation set exists.
        plan_kwargs
            Options of :class:`~perturbdiff_scvi.model.DiffusionTrainingPlan` (``weight_decay``, ``warmup_steps``,
            ...).
        datasplitter_kwargs
            Options of :class:`~perturbdiff_scvi.data.SetDataSplitter` (``seed``, ``pin_memory``).
        batch_size
            Deprecated name of ``sets_per_batch`` (it counts sets, not cells, unlike other scvi-tools models);
            warns with a ``FutureWarning``.
        compile
            Compile the denoiser's forward with :func:`torch.compile` for this training run (the first steps
            then take longer). Only the denoiser is compiled (not the noising or the loss); parameter names and
            the saved ``state_dict`` are those of the eager model, and the eager forward is restored when
            training ends. scvi-tools' ``plan_kwargs={"compile": True}`` instead compiles the whole module.
        compile_kwargs
            Options of :func:`torch.compile` (``mode``, ``dynamic``, ``backend``, ...) when ``compile=True``.
        **trainer_kwargs
            Passed to the Lightning trainer (``enable_progress_bar``, ``callbacks``, ...). ``precision="bf16-mixed"``
            runs the denoiser in bf16 autocast (the weights, the loss and the energy distance stay float32).

        Examples
        --------
        >>> model.train(max_steps=1500)
        >>> model.history["train_loss_epoch"].tail()
        """
        if batch_size is not None:
            warnings.warn(
                "train(batch_size=...) is deprecated: it counts cell sets per step, not cells; use "
                "sets_per_batch=... instead.",
                FutureWarning,
                stacklevel=settings.warnings_stacklevel,
            )
            sets_per_batch = batch_size
        max_epochs, max_steps, sets_per_batch, lr = _train.checked_lengths(max_epochs, max_steps, sets_per_batch, lr)
        compile, compile_kwargs = _train.checked_compile(compile, compile_kwargs)
        splitter = self._data_splitter_cls(
            self.adata_manager,
            self._control_code,
            set_size=self.module.set_size,
            sets_per_batch=sets_per_batch,
            validation_size=validation_size,
            split=split,
            train_on_controls=train_on_controls,
            **(datasplitter_kwargs or {}),
        )
        has_val = splitter.n_val > 0
        if early_stopping and not has_val:
            raise ValueError(
                "early_stopping=True needs a validation set, but validation_size="
                f"{validation_size} with split={split!r} left no validation cells; raise validation_size "
                "or use split='cell'."
            )
        if trainer_kwargs.get("use_distributed_sampler"):
            raise ValueError(
                "use_distributed_sampler=True is not supported: the set sampler shards the sets over processes itself."
            )
        trainer_kwargs["use_distributed_sampler"] = False
        train_sampler = splitter.train_dataloader().sampler
        plan = self._training_plan_cls(self.module, **{"lr": lr, **(plan_kwargs or {})})

        def make_runner(world_size: int):
            kwargs = {**trainer_kwargs}
            if "callbacks" in kwargs:  # scvi's Trainer appends its own callbacks to the list it gets
                kwargs["callbacks"] = list(kwargs["callbacks"])
            steps_per_epoch = train_sampler.n_batches(world_size)
            if steps_per_epoch == 0:
                raise ValueError(
                    f"{train_sampler.n_sets} training set(s) cannot be shared by {world_size} processes; use fewer "
                    "devices, a smaller set_size or a smaller validation_size."
                )
            epochs = _train.schedule_trainer(
                steps_per_epoch, max_epochs, max_steps, has_val, check_val_every_n_epoch, kwargs
            )
            return self._train_runner_cls(
                self,
                training_plan=plan,
                data_splitter=splitter,
                max_epochs=epochs,
                max_steps=-1 if max_steps is None else max_steps,
                accelerator=accelerator,
                devices=devices,
                early_stopping=early_stopping,
                **kwargs,
            )

        with warnings.catch_warnings(record=True) as caught:  # the trainer tells the number of processes
            warnings.simplefilter("always")
            runner = make_runner(1)
        if runner.trainer.world_size > 1:  # each process serves its shard of the sets: fewer steps per epoch
            runner = make_runner(runner.trainer.world_size)  # (warns again what the first trainer warned)
        else:
            for w in caught:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
        with _train.compiled_denoiser(self.module, compile, compile_kwargs):
            return _train.run_interruptible(self, runner)

    # ------------------------------------------------------------------ save / load
    def save(
        self,
        dir_path: str | os.PathLike,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        **kwargs,
    ) -> None:
        """Save the model (scvi-tools format) atomically.

        Everything is written to a temporary folder next to ``dir_path`` that is renamed into place at
        the end, so an interrupted save never leaves a half-written model at ``dir_path`` (with
        ``overwrite=True`` the previous model stays intact until the new one is complete).

        Parameters
        ----------
        dir_path
            Folder to save into.
        prefix
            Prefix of the file names.
        overwrite
            Replace an existing folder.
        save_anndata
            Also write the registered AnnData (makes the folder self-contained).
        **kwargs
            Passed to :meth:`scvi.model.base.BaseModelClass.save`.

        Examples
        --------
        >>> model.save("kang_model", overwrite=True)
        >>> model = PerturbDiff.load("kang_model", adata=train)
        """
        _io.atomic_save(
            lambda tmp: super(PerturbDiff, self).save(
                tmp, prefix=prefix, overwrite=True, save_anndata=save_anndata, **kwargs
            ),
            dir_path,
            overwrite=overwrite,
        )

    @classmethod
    def load(cls, dir_path: str | os.PathLike, adata: AnnData | MuData | None = None, **kwargs) -> PerturbDiff:
        """Load a model saved with :meth:`save`, with clear errors for missing, corrupt or mismatched inputs.

        Parameters
        ----------
        dir_path
            Folder written by :meth:`save`.
        adata
            The AnnData (or MuData) the model was trained on, or one with the same genes in the same order
            and the same categories; not needed if the model was saved with ``save_anndata=True``.
        **kwargs
            Passed to :meth:`scvi.model.base.BaseModelClass.load` (``accelerator``, ``device``, ``prefix``).

        Examples
        --------
        >>> model = PerturbDiff.load("kang_model", adata=train)
        """
        saved_genes = _io.read_saved_model(dir_path, kwargs.get("prefix"), cls.__name__)
        if adata is not None:
            _io.check_same_genes(adata, saved_genes)
        try:
            return super().load(str(dir_path), adata=adata, **kwargs)
        except (ValueError, KeyError, RuntimeError) as err:
            raise ValueError(
                f"The data given to PerturbDiff.load() does not match the saved model: {err} Pass the "
                "AnnData the model was trained on (same genes in the same order, same perturbation, "
                "context and batch categories)."
            ) from err

    # ------------------------------------------------------------------ prediction
    @torch.inference_mode()
    def predict_population(
        self,
        perturbations: str | Sequence[str],
        contexts: str | Sequence[str] | None = None,
        batches: str | Sequence[str] | None = None,
        *,
        control_adata: AnnData | None = None,
        n_cells: int | None = None,
        n_populations: int = 1,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        n_steps: int | None = None,
        sampler: Literal["ddim", "ddpm", "ddim_truncated"] = "ddim",
        seed: int | None = None,
        batch_size: int = 16,
        use_ema: bool = True,
        bias_correction: bool = False,
        zero_threshold: float | Literal["auto"] | None = None,
        start_time: int | None = None,
        x0_bound: float | Literal["auto"] | None = "auto",
        init: Literal["noise", "control"] = "noise",
        counts: bool = False,
        counts_layer: str = "counts",
        transport: Literal["none", "quantile"] = "none",
        progress_bar: bool = True,
    ) -> AnnData:
        """Generate cell populations for (perturbation, context, batch) combinations.

        Counts (``n_cells``, ``n_populations``, ``n_steps``, ``start_time``, ``batch_size``) accept whole-number
        floats such as ``2.0`` as integers; anything else raises a ``ValueError`` naming the argument.

        Every requested perturbation is crossed with every requested context and batch. A combination
        never observed together in training works as long as the perturbation and the context were each
        observed. Each population of ``n_cells`` cells is generated as ``ceil(n_cells / set_size)`` sets,
        each conditioned on its own draw of control cells.

        Parameters
        ----------
        perturbations
            Perturbation value(s) of ``perturbation_key``. With ``combination_delimiter`` set at setup, also
            combinations never measured (e.g. ``"KLF1+MAP2K6"``) whose components occur in the training cells.
        contexts
            Context value(s); ``None`` = every context of the training data.
        batches
            Batch value(s); ``None`` = every batch that has control cells of the context (or, with
            ``control_adata``, every batch found there).
        control_adata
            Condition on these control cells instead of the registered ones. Needs every training gene
            (reordered by name); cells are matched to contexts and batches through the same obs columns
            when present, else all its cells serve every context. Cells whose perturbation column (if
            present) differs from the control value are ignored.
        n_cells
            Cells per population; ``None`` = the number of observed cells of that combination in the
            training data, else of its control pool.
        n_populations
            Independent populations per combination (the response is a distribution over populations).
        guidance_scale
            Classifier-free guidance weight ``w``: ``(1 + w) x0_cond - w x0_uncond``; 0 = no guidance. The
            default 0.5 was measured best for the small default model on the bundled data; the released
            value is 1.0 (use it with ``PAPER_CONFIG``). With weak responses (e.g. CRISPR screens) 0 did
            better: on Norman 2019, three seeds, it lowered the E-distance from 0.33 to 0.19, while on strongly
            responding cells (Kang's monocytes) it doubled it (``benchmarks/README.md``).
        n_steps
            Reverse steps of ``"ddim"`` / ``"ddpm"``, strided over the full schedule (1 to ``n_timesteps``);
            ``None`` = 1: one jump from pure noise to the model's clean estimate, which on every benchmark task
            and seed gave more believable cells and better shifts than 50 steps (the earlier default; see
            ``benchmarks/README.md``). Not used by ``"ddim_truncated"`` (an explicit value raises a ``ValueError``).
        sampler
            ``"ddim"`` (deterministic, eta = 0, the default), ``"ddpm"`` (ancestral), or ``"ddim_truncated"``: the
            sampler of the official release (method.md section 5), DDIM eta = 0 over ``t = start_time - 1, ..., 0``,
            one step at a time on the full ``n_timesteps`` schedule, starting from pure noise ``N(0, I)`` placed at
            ``t = start_time - 1`` (the release does not noise the control set or any data). With the released
            ``start_time=100`` of T = 1000 this runs only the last 100 timesteps (``abar`` about 0.90 at the start),
            not a 100-step DDIM over the whole range. Guidance, self-conditioning and the ``1e-4`` cutoff are the
            same for all samplers.
        seed
            Seed of the control draws and the noise; the same seed gives the same cells.
        batch_size
            Sets per forward pass.
        use_ema
            Use the EMA weights (as released) rather than the raw weights.
        bias_correction
            Not in the released method (off by default). Also generate the *control* population from the same
            control draws and subtract, per gene, its mean error against those control cells:
            ``x' = max(0, x - (mean(x_ctrl_generated) - mean(x_ctrl)))``. This removes the model's systematic
            per-gene error in that context from the predicted shift; it doubles the sampling time and needs a
            model trained with ``train_on_controls=True`` (the default).
        zero_threshold
            Set predicted values below this to exactly 0, for a realistic zero pattern before differential
            expression (``sc.tl.rank_genes_groups``, cell-eval's DE metrics): a dense prediction gives near-zero
            genes huge fold changes (see :mod:`perturbdiff_scvi.metrics`, "DE-sparsity"). ``"auto"`` = the 1 %
            quantile of the non-zero registered training values
            (:func:`~perturbdiff_scvi.metrics.realistic_zero_threshold`), below which real data have almost no
            value. ``None`` (default) keeps the released output, where only values below ``1e-4`` are 0.
        start_time
            Only for ``sampler="ddim_truncated"``: its first timestep + 1, an integer from 1 to ``n_timesteps``;
            ``None`` = the released 100 (or ``n_timesteps`` if smaller). Recorded in ``uns["perturbdiff"]`` (and
            ``n_steps`` there is the number of steps run, ``start_time``); giving it with another sampler raises a
            ``ValueError``.
        x0_bound
            Not in the released method (which has no cap: ``x0_bound=None``). Cap the clean estimate ``x0`` at every
            reverse step (and so the output) to ``[0, x0_bound]``, in the units of the expression: ``"auto"``
            (default) = 1.5 x each gene's maximum in the registered training matrix (a gene never expressed in
            training is then predicted 0), a number = one cap for every gene, ``None`` = no cap (values are only
            >= 0, as released). The default is ``"auto"`` because, measured on four tasks and three seeds
            (benchmarks/README.md, "Values in range"), it changes no accuracy or realism metric beyond seed noise
            and keeps dense high-valued panels in range, where uncapped predictions reach 2-3x the training
            maximum (which cell-eval refuses). Each step's capped
            estimate also drives the DDIM update and the self-conditioning, like a clipped ``x0`` in image
            diffusion; with ``bias_correction`` the corrected values are capped again. Recorded in
            ``uns["perturbdiff"]["x0_bound"]``.
        init
            Not in the released method. ``"noise"`` (default, released): the reverse chain starts from pure noise.
            ``"control"``: it starts from the matched control set noised to the first visited timestep (SDEdit);
            then ``start_time`` also applies to ``"ddim"`` / ``"ddpm"`` (``min(n_steps, start_time)`` steps
            strided over ``start_time - 1, ..., 0``; with the default ``n_steps`` one denoising of the controls
            noised to ``start_time - 1``) and sets how far the cells may move from their controls.
            Measured on Kang and the dense panel it did not make cells more realistic (benchmarks/README.md).
        counts
            Also sample counts, for count-based tools (e.g. DE with pydeseq2 or ``sc.pp.normalize_total``
            pipelines): cell ``i`` of each set gets the library size (total over the model's genes) of control cell
            ``i`` of the set's control draw, and ``counts ~ Multinomial(library, expm1(x) / sum expm1(x))``, with
            ``x`` first capped at each gene's training maximum (``expm1`` of a value far above the data range
            would take nearly all of a cell's counts). They
            are returned in ``layers["counts"]``, and ``X`` is re-normalised from them,
            ``log1p(counts * sum(expm1(x)) / library)``, on each predicted cell's own scale (so ``X`` then has
            the sampling noise and the zeros of real counts). Needs raw counts of the control cells
            (``counts_layer``).
        counts_layer
            With ``counts=True``: the layer of the registered AnnData (its RNA modality for MuData), or of
            ``control_adata`` when given, that holds raw counts (whole numbers) of the control cells.
        transport
            Not in the released method. ``"none"`` (default): the generated cells. ``"quantile"``: for each
            population, ``n`` distinct control cells of its (context, batch) (drawn without replacement; repeated
            only when the pool has fewer than ``n`` cells), each moved gene by gene onto the generated
            population's distribution of that gene (the control cell of rank ``r`` for a gene, ties broken at
            random, takes the ``r``-th smallest generated value: one-dimensional optimal transport per gene). The
            output keeps the generated per-gene distributions (so means, shifts and DE are unchanged) and takes
            its joint structure, which genes are high together in a cell, from real control cells; with
            ``counts=True`` each cell takes the library size of the control cell it comes from. Applied after
            ``bias_correction`` and ``zero_threshold``, before ``counts``. Measured in ``benchmarks/README.md``
            ("Texture").
        progress_bar
            Show scvi-tools' progress bar over the forward passes (``batch_size`` sets each, across all
            conditions and populations) when there are at least two.

        Returns
        -------
        AnnData with ``var_names`` = training genes, ``obs`` holding the user's perturbation / context /
        batch columns (categorical) and ``population``, and the settings in ``uns["perturbdiff"]``.

        Examples
        --------
        >>> pred = model.predict_population("stimulated", contexts="CD4T", n_populations=3, seed=0)
        >>> sc.pl.umap(anndata.concat([real, pred], label="source"), color="condition")
        >>> released = model.predict_population("stimulated", contexts="CD4T", sampler="ddim_truncated",
        ...                                     start_time=100, guidance_scale=1.0, seed=0)
        >>> bounded = model.predict_population("stimulated", contexts="CD4T", x0_bound="auto", seed=0)
        >>> with_counts = model.predict_population("stimulated", contexts="CD4T", counts=True, seed=0)
        >>> with_counts.layers["counts"]  # whole numbers; with_counts.X re-normalised from them
        """
        self._check_if_trained(warn=True)
        options = _predict.SamplingOptions.checked(
            n_steps=n_steps,
            sampler=sampler,
            guidance_scale=guidance_scale,
            batch_size=batch_size,
            use_ema=use_ema,
            n_timesteps=self.module.diffusion.n_timesteps,
            start_time=start_time,
            init=init,
            progress_bar=progress_bar,
        )
        return _predict.predict(
            self,
            perturbations,
            contexts,
            batches,
            control_adata=control_adata,
            n_cells=n_cells,
            n_populations=n_populations,
            options=options,
            seed=optional_seed(seed),
            bias_correction=bias_correction,
            zero_threshold=zero_threshold,
            x0_bound=x0_bound,
            counts=counts,
            counts_layer=counts_layer,
            transport=transport,
        )
