"""PerturbDiff: the user-facing scvi-tools model (setup, train, predict, save/load)."""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np
import pandas as pd
import rich.pretty  # noqa: F401  (scvi 1.4.2 + rich>=15: view_anndata_setup needs it imported)
import torch
from anndata import AnnData
from scipy import sparse
from scvi import settings
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LayerField, MuDataCategoricalObsField, MuDataLayerField
from scvi.model.base import BaseModelClass
from scvi.train import TrainRunner
from scvi.utils import setup_anndata_dsp

from .._combinations import PerturbationVocabulary, check_delimiter, check_labels
from .._compat import devices_dsp
from .._constants import PDIFF_KEYS
from ..data import SetDataSplitter, control_pool, registered_codes
from ..module import PerturbDiffModule
from ._training_plan import DiffusionTrainingPlan
from ._validation import (
    check_control_value,
    check_log_normalised,
    check_obs_column,
    expression_matrix,
    find_category,
    positive_int,
)

if TYPE_CHECKING:
    from mudata import MuData

logger = logging.getLogger(__name__)

#: The sizes of the released model (Yuan et al. 2026), for GPUs: ``PerturbDiff(adata, **PAPER_CONFIG)``; predict
#: with the released ``guidance_scale=1.0``.
PAPER_CONFIG: dict = {
    "n_hidden": 512,
    "depth": 8,
    "n_heads": 8,
    "n_cov": 128,
    "set_size": 256,
    "input_scale": 10.0,
    "ema_every": 10,
    "p_drop_cond": 0.5,
}

#: Optimisation steps when ``train()`` is given neither ``max_epochs`` nor ``max_steps``.
DEFAULT_MAX_STEPS = 1500

#: Default classifier-free guidance weight of ``predict_population`` (released: 1.0, the value for
#: ``PAPER_CONFIG``). Measured on the benchmark tasks with the small defaults (see the README): 0.5 gives
#: better mean shifts than 1.0 with seeds 0 / 1 (Kang pearson_delta 0.882 / 0.864 vs 0.876 / 0.860, Norman
#: 0.675 / 0.636 vs 0.648 / 0.610) at a similar or lower E-distance.
DEFAULT_GUIDANCE_SCALE = 0.5


class PerturbDiff(BaseModelClass):
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
    energy_weight
        Weight of the set energy term in the loss (1 as released; 0 gives a per-cell MSE-only model).
    mse_weight
        Weight of the per-cell MSE term.
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
        input_scale: float = 1.0,
        energy_weight: float = 1.0,
        mse_weight: float = 1.0,
        p_drop_cond: float = 0.2,
        p_self_cond: float = 0.5,
        ema_decay: float = 0.99,
        ema_every: int = 1,
    ):
        super().__init__(adata)
        for name, value in {
            "set_size": set_size,
            "n_hidden": n_hidden,
            "depth": depth,
            "n_heads": n_heads,
            "n_timesteps": n_timesteps,
            "ema_every": ema_every,
        }.items():
            positive_int(value, name)
        if (2 * n_hidden) % n_heads:
            raise ValueError(f"2 * n_hidden ({2 * n_hidden}) must be divisible by n_heads ({n_heads}).")
        ss = self.summary_stats
        vocab = self._vocabulary
        self.module = self._module_cls(
            n_genes=ss.n_vars,
            n_perturbations=ss[f"n_{PDIFF_KEYS.PERT_KEY}"] if vocab is None else len(vocab.components),
            n_contexts=ss[f"n_{PDIFF_KEYS.CONTEXT_KEY}"],
            n_batches=ss[f"n_{PDIFF_KEYS.BATCH_KEY}"],
            perturbation_components=None if vocab is None else torch.from_numpy(vocab.matrix),
            set_size=set_size,
            n_hidden=n_hidden,
            depth=depth,
            n_heads=n_heads,
            mlp_ratio=mlp_ratio,
            n_cov=n_cov,
            n_cov_hidden=n_cov_hidden,
            n_timesteps=n_timesteps,
            beta_schedule=beta_schedule,
            input_scale=input_scale,
            energy_weight=energy_weight,
            mse_weight=mse_weight,
            p_drop_cond=p_drop_cond,
            p_self_cond=p_self_cond,
            ema_decay=ema_decay,
            ema_every=ema_every,
        )
        n_params = sum(p.numel() for p in self.module.denoiser.parameters())
        self._model_summary_string = (
            f"PerturbDiff: {ss.n_vars} genes, set_size={set_size}, n_hidden={n_hidden}, depth={depth}, "
            f"n_heads={n_heads}, T={n_timesteps}, {n_params / 1e6:.2f}M parameters"
            + ("" if vocab is None else f", {len(vocab.components)} perturbation components")
        )
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------------ setup
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

        Examples
        --------
        >>> PerturbDiff.setup_anndata(adata, perturbation_key="condition", control_value="control",
        ...                           context_key="cell_type")
        >>> PerturbDiff.setup_anndata(norman, perturbation_key="perturbation", control_value="control",
        ...                           combination_delimiter="+")
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        if not isinstance(adata, AnnData):
            raise TypeError(
                f"setup_anndata expects an AnnData, got {type(adata).__name__}; use setup_mudata for MuData."
            )
        _check_setup_inputs(
            adata,
            adata.obs,
            perturbation_key,
            control_value,
            context_key,
            batch_key,
            expression_matrix(adata, layer),
            "adata.X" if layer is None else f"adata.layers[{layer!r}]",
            combination_delimiter,
        )
        fields = [
            LayerField(PDIFF_KEYS.X_KEY, layer, is_count_data=False),
            CategoricalObsField(PDIFF_KEYS.PERT_KEY, perturbation_key),
            CategoricalObsField(PDIFF_KEYS.CONTEXT_KEY, context_key),
            CategoricalObsField(PDIFF_KEYS.BATCH_KEY, batch_key),
        ]
        adata_manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
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
        modalities = {"rna_layer": "rna"} if modalities is None else dict(modalities)
        if len(modalities) != 1 or set(modalities) - {"rna_layer", "rna"}:
            raise ValueError(
                f"modalities must name the RNA modality, e.g. {{'rna_layer': 'rna'}} (or {{'rna': ...}}); "
                f"got {modalities}."
            )
        rna_mod = next(iter(modalities.values()))
        if rna_mod not in mdata.mod:
            raise KeyError(
                f"Modality {rna_mod!r} not found in mdata.mod (available: {list(mdata.mod)}); set "
                "modalities={'rna_layer': <RNA modality>}."
            )
        rna = mdata.mod[rna_mod]
        if rna.n_obs != mdata.n_obs or not rna.obs_names.equals(mdata.obs_names):
            raise ValueError(
                f"Modality {rna_mod!r} has {rna.n_obs} cells but mdata has {mdata.n_obs} (or another "
                "order); PerturbDiff needs RNA for every cell. Subset mdata to the RNA cells first."
            )

        def obs_mod(key: str | None) -> str | None:
            return None if key is None or key in mdata.obs.columns else rna_mod

        obs = {k: (mdata.obs if obs_mod(k) is None else rna.obs) for k in (perturbation_key, context_key, batch_key)}
        merged = pd.DataFrame(
            {k: v[k] for k, v in obs.items() if k is not None and k in v.columns}, index=mdata.obs_names
        )
        for key in (perturbation_key, context_key, batch_key):
            if key is not None and key not in merged.columns:
                raise KeyError(f"{key!r} is neither a column of mdata.obs nor of mdata[{rna_mod!r}].obs.")
        where = f"mdata[{rna_mod!r}]." + ("X" if rna_layer is None else f"layers[{rna_layer!r}]")
        _check_setup_inputs(
            rna,
            merged,
            perturbation_key,
            control_value,
            context_key,
            batch_key,
            expression_matrix(rna, rna_layer),
            where,
            combination_delimiter,
        )
        fields = [
            MuDataLayerField(PDIFF_KEYS.X_KEY, rna_layer, mod_key=rna_mod, is_count_data=False, mod_required=True),
            MuDataCategoricalObsField(PDIFF_KEYS.PERT_KEY, perturbation_key, mod_key=obs_mod(perturbation_key)),
            MuDataCategoricalObsField(PDIFF_KEYS.CONTEXT_KEY, context_key, mod_key=obs_mod(context_key)),
            MuDataCategoricalObsField(PDIFF_KEYS.BATCH_KEY, batch_key, mod_key=obs_mod(batch_key)),
        ]
        adata_manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(mdata, **kwargs)
        cls.register_manager(adata_manager)

    # ------------------------------------------------------------------ helpers
    def _mapping(self, key: str) -> np.ndarray:
        return self.adata_manager.get_state_registry(key).categorical_mapping

    @property
    def _control_code(self) -> int:
        return find_category(
            self._mapping(PDIFF_KEYS.PERT_KEY),
            self.get_setup_arg("control_value"),
            "control value",
            self.get_setup_arg("perturbation_key"),
        )

    @property
    def _vocabulary(self) -> PerturbationVocabulary | None:
        """Components of the perturbation labels, when set up with ``combination_delimiter``."""
        delimiter = self._setup_arg("combination_delimiter")
        if delimiter is None:
            return None
        return PerturbationVocabulary(self._mapping(PDIFF_KEYS.PERT_KEY), delimiter, self._setup_arg("control_value"))

    @property
    def var_names(self) -> pd.Index:
        """Genes the model was trained on, in order."""
        return pd.Index(self.adata_manager.get_state_registry(PDIFF_KEYS.X_KEY).column_names)

    def _setup_arg(self, name: str):
        return self.adata_manager.registry["setup_args"].get(name)

    def get_setup_arg(self, name: str):
        """Value of an argument given to :meth:`setup_anndata` / :meth:`setup_mudata`."""
        return self._setup_arg(name)

    # ------------------------------------------------------------------ training
    @devices_dsp.dedent
    def train(
        self,
        max_epochs: int | None = None,
        max_steps: int | None = None,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        batch_size: int = 8,
        lr: float = 1e-3,
        early_stopping: bool = False,
        validation_size: float = 0.1,
        split: Literal["set", "cell", "group"] = "set",
        train_on_controls: bool = True,
        check_val_every_n_epoch: int | None = None,
        plan_kwargs: dict | None = None,
        datasplitter_kwargs: dict | None = None,
        **trainer_kwargs,
    ):
        """Train the model with Lightning through scvi-tools' ``TrainRunner``.

        Parameters
        ----------
        max_epochs
            Epochs; one epoch serves every training cell once in sets of ``set_size`` (groups padded).
        max_steps
            Optimisation steps; if neither is given, ``DEFAULT_MAX_STEPS`` (1500) steps.
        %(param_accelerator)s
        %(param_devices)s
        batch_size
            Cell sets per optimisation step (each set holds ``set_size`` cells plus as many controls).
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
        **trainer_kwargs
            Passed to the Lightning trainer (``enable_progress_bar``, ``precision``, ``callbacks``, ...).

        Examples
        --------
        >>> model.train(max_steps=1500)
        >>> model.history["train_loss_epoch"].tail()
        """
        if max_epochs is None and max_steps is None:
            max_steps = DEFAULT_MAX_STEPS
        max_epochs = None if max_epochs is None else positive_int(max_epochs, "max_epochs")
        max_steps = None if max_steps is None else positive_int(max_steps, "max_steps")
        batch_size = positive_int(batch_size, "batch_size")
        if lr <= 0:
            raise ValueError(f"lr must be > 0; got {lr}.")
        splitter = self._data_splitter_cls(
            self.adata_manager,
            self._control_code,
            set_size=self.module.set_size,
            sets_per_batch=batch_size,
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
        steps_per_epoch = len(splitter.train_dataloader().sampler)
        if max_epochs is None:  # a finite epoch count keeps the progress bar readable ("Epoch 12/375")
            max_epochs = math.ceil(max_steps / steps_per_epoch)
        if check_val_every_n_epoch is None and has_val:
            check_val_every_n_epoch = max(1, math.ceil(50 / steps_per_epoch))
        if check_val_every_n_epoch is not None:
            trainer_kwargs["check_val_every_n_epoch"] = check_val_every_n_epoch
        trainer_kwargs.setdefault("early_stopping_monitor", "validation_loss")
        trainer_kwargs.setdefault("gradient_clip_val", 1.0)
        trainer_kwargs.setdefault("log_every_n_steps", max(1, min(50, steps_per_epoch)))
        plan = self._training_plan_cls(self.module, **{"lr": lr, **(plan_kwargs or {})})
        runner = self._train_runner_cls(
            self,
            training_plan=plan,
            data_splitter=splitter,
            max_epochs=max_epochs,
            max_steps=-1 if max_steps is None else max_steps,
            accelerator=accelerator,
            devices=devices,
            early_stopping=early_stopping,
            **trainer_kwargs,
        )
        # A trained model is left in eval mode and Lightning keeps module modes as found: switch back, or
        # further training would skip self-conditioning.
        self.module.train()
        sigint_handler = signal.getsignal(signal.SIGINT)
        try:
            return runner()
        except (KeyboardInterrupt, SystemExit) as err:
            # Lightning turns Ctrl+C into sys.exit(1) and ignores further Ctrl+C; undo both and keep the model.
            if isinstance(err, SystemExit) and not runner.trainer.interrupted:
                raise
            self._after_interrupt(runner, sigint_handler)

    def _after_interrupt(self, runner, sigint_handler) -> None:
        """Leave a usable model after Ctrl+C: weights of the last completed step, eval mode, history kept."""
        try:
            signal.signal(signal.SIGINT, sigint_handler)
        except ValueError:  # not the main thread: nothing was changed there
            pass
        steps = int(runner.trainer.global_step)
        self.module.eval()
        self.is_trained_ = self.is_trained_ or steps > 0
        splitter = runner.data_splitter
        self.train_indices, self.validation_indices = splitter.train_idx, splitter.val_idx
        self.test_indices = splitter.test_idx
        warnings.warn(
            f"Training interrupted after {steps} optimisation steps; the model keeps the weights of the last completed "
            "step and can predict, be saved or be trained further.",
            UserWarning,
            stacklevel=settings.warnings_stacklevel,
        )

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
        target = Path(dir_path)
        if target.exists() and not overwrite:
            raise FileExistsError(f"{str(target)!r} already exists; pass overwrite=True or choose another folder.")
        token = uuid.uuid4().hex[:8]
        tmp = target.parent / f".{target.name}.saving-{token}"
        old = target.parent / f".{target.name}.replaced-{token}"
        try:
            super().save(str(tmp), prefix=prefix, overwrite=True, save_anndata=save_anndata, **kwargs)
            if target.exists():
                os.replace(target, old)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)

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
        path = Path(dir_path)
        model_file = path / f"{kwargs.get('prefix') or ''}model.pt"
        if not path.is_dir():
            raise FileNotFoundError(f"No saved model at {str(path)!r}: the folder does not exist.")
        if not model_file.is_file():
            raise FileNotFoundError(
                f"{str(path)!r} holds no {model_file.name!r}; it is not a folder written by PerturbDiff.save()."
            )
        try:
            saved = torch.load(model_file, map_location="cpu", weights_only=False)
            saved_name = saved["attr_dict"]["registry_"]["model_name"]
            saved_genes = saved["var_names"]
        except Exception as err:  # any failure here means an unreadable file
            raise ValueError(
                f"Could not read the saved model {str(model_file)!r}: the file is corrupt or incomplete "
                f"({type(err).__name__}: {err}). Save the model again."
            ) from err
        if saved_name != cls.__name__:
            raise ValueError(f"{str(path)!r} holds a {saved_name} model, not a {cls.__name__}.")
        if adata is not None:
            _check_same_genes(adata, saved_genes)
        try:
            return super().load(str(path), adata=adata, **kwargs)
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
        n_steps: int = 50,
        sampler: Literal["ddim", "ddpm"] = "ddim",
        seed: int | None = None,
        batch_size: int = 16,
        use_ema: bool = True,
        bias_correction: bool = False,
        zero_threshold: float | Literal["auto"] | None = None,
    ) -> AnnData:
        """Generate cell populations for (perturbation, context, batch) combinations.

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
            value is 1.0 (use it with ``PAPER_CONFIG``).
        n_steps
            Reverse steps, strided over the full schedule (1 to ``n_timesteps``).
        sampler
            ``"ddim"`` (deterministic, eta = 0) or ``"ddpm"`` (ancestral).
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

        Returns
        -------
        AnnData with ``var_names`` = training genes, ``obs`` holding the user's perturbation / context /
        batch columns (categorical) and ``population``, and the settings in ``uns["perturbdiff"]``.

        Examples
        --------
        >>> pred = model.predict_population("stimulated", contexts="CD4T", n_populations=3, seed=0)
        >>> sc.pl.umap(anndata.concat([real, pred], label="source"), color="condition")
        """
        self._check_if_trained(warn=True)
        n_cells, n_populations, n_steps, batch_size = _check_predict_args(
            n_cells, n_populations, guidance_scale, n_steps, self.module.diffusion.n_timesteps, sampler, batch_size
        )
        zero_threshold = self._zero_threshold(zero_threshold)
        perturbations = _as_list(perturbations, "perturbations")
        pert_key, ctx_key, batch_key = (self._setup_arg(k) for k in ("perturbation_key", "context_key", "batch_key"))
        pert_codes, ctx_codes, batch_codes = registered_codes(self.adata_manager)
        perts = [self._perturbation(v, pert_codes, pert_key) for v in perturbations]
        if contexts is None:
            c_ids = np.unique(ctx_codes).tolist()
        else:
            c_ids = [
                self._seen_code(PDIFF_KEYS.CONTEXT_KEY, v, ctx_codes, "context", ctx_key)
                for v in _as_list(contexts, "contexts")
            ]
        b_req = (
            None
            if batches is None
            else [
                find_category(self._mapping(PDIFF_KEYS.BATCH_KEY), v, "batch", str(batch_key))
                for v in _as_list(batches, "batches")
            ]
        )
        source = _ControlSource(self, control_adata, pert_codes, ctx_codes, batch_codes)
        rng = np.random.default_rng(seed)
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))

        # Plan every set: (condition index, population, control rows).
        conditions, jobs = [], []
        for label, pert, code in perts:
            for c in c_ids:
                for b in source.batches_for(c, b_req):
                    pool = source.pool(c, b)
                    observed = int(np.sum((pert_codes == code) & (ctx_codes == c) & (batch_codes == b)))
                    n = n_cells or observed or len(pool)
                    conditions.append(_Condition(label, pert, code, c, b, n))
                    for pop in range(n_populations):
                        for _ in range(math.ceil(n / self.module.set_size)):
                            jobs.append((len(conditions) - 1, pop, rng.choice(len(pool), self.module.set_size)))
        cells = self._sample_jobs(jobs, conditions, source, n_steps, sampler, guidance_scale, gen, batch_size, use_ema)
        if bias_correction:
            control = self._perturbation(self.get_setup_arg("control_value"), pert_codes, pert_key)
            as_control = [cond._replace(label=control[0], pert=control[1], code=control[2]) for cond in conditions]
            regenerated = self._sample_jobs(
                jobs, as_control, source, n_steps, sampler, guidance_scale, gen, batch_size, use_ema
            )
            cells = _subtract_control_bias(jobs, conditions, cells, regenerated, source)
        if zero_threshold is not None:
            from ..metrics._sparsity import zero_small_values  # lazy: keeps the metrics package off import

            cells = [zero_small_values(x, zero_threshold) for x in cells]
        return self._assemble(
            conditions,
            jobs,
            cells,
            n_populations,
            pert_key,
            ctx_key,
            batch_key,
            uns={
                "perturbations": [str(v) for v in perturbations],
                "n_populations": n_populations,
                "guidance_scale": float(guidance_scale),
                "n_steps": int(n_steps),
                "sampler": sampler,
                "seed": "None" if seed is None else int(seed),
                "set_size": int(self.module.set_size),
                "use_ema": bool(use_ema),
                "controls": "control_adata" if control_adata is not None else "registered",
                "bias_correction": bool(bias_correction),
                "zero_threshold": "None" if zero_threshold is None else float(zero_threshold),
            },
        )

    def _zero_threshold(self, value) -> float | None:
        """``zero_threshold`` as a float (``"auto"``: from the registered training matrix) or ``None``."""
        if value is None:
            return None
        if isinstance(value, str) and value == "auto":
            from ..metrics._sparsity import realistic_zero_threshold

            return realistic_zero_threshold(self.adata_manager.get_from_registry(PDIFF_KEYS.X_KEY))
        if isinstance(value, bool) or not isinstance(value, int | float | np.number) or not np.isfinite(value):
            raise ValueError(f"zero_threshold must be None, 'auto' or a finite number >= 0; got {value!r}.")
        if value < 0:
            raise ValueError(f"zero_threshold must be >= 0 (values below it become 0); got {value!r}.")
        return float(value)

    def _perturbation(self, value, codes: np.ndarray, obs_key: str) -> tuple[str, object, int]:
        """``(label, what the module embeds, registered code or -1)`` of a requested perturbation.

        Without ``combination_delimiter`` the module embeds the registered code; with it, the component
        codes, which also exist for a combination that was never registered.
        """
        vocab = self._vocabulary
        if vocab is None:
            code = self._seen_code(PDIFF_KEYS.PERT_KEY, value, codes, "perturbation", obs_key)
            return self._mapping(PDIFF_KEYS.PERT_KEY)[code], code, code
        mapping = [str(v) for v in self._mapping(PDIFF_KEYS.PERT_KEY)]
        code = mapping.index(str(value)) if str(value) in mapping else -1
        if code >= 0 and np.any(codes == code):
            return self._mapping(PDIFF_KEYS.PERT_KEY)[code], vocab.matrix[code][vocab.matrix[code] >= 0], code
        return str(value), vocab.codes(value, vocab.seen_components(codes), obs_key), code

    def _seen_code(self, key: str, value, codes: np.ndarray, what: str, obs_key: str | None) -> int:
        code = find_category(self._mapping(key), value, what, str(obs_key))
        if not np.any(codes == code):
            raise ValueError(
                f"The {what} {value!r} has no cells in the training data (it is only an unused category "
                f"of {obs_key!r}), so the model never learned it."
            )
        return code

    def _sample_jobs(
        self, jobs, conditions, source, n_steps, sampler, guidance_scale, gen, batch_size, use_ema
    ) -> list[np.ndarray]:
        from scvi.utils import track

        s = self.module.set_size
        out = []
        chunks = range(0, len(jobs), batch_size)
        for start in track(chunks, description="Sampling sets", disable=len(chunks) < 2):
            chunk = jobs[start : start + batch_size]
            conds = [conditions[ci] for ci, _, _ in chunk]
            x_ctrl = np.stack(
                [source.rows(cond.ctx, cond.batch, job[2]) for cond, job in zip(conds, chunk, strict=True)]
            )
            x = self.module.sample(
                torch.from_numpy(x_ctrl),  # (B, S, G)
                _perturbation_tensor([cond.pert for cond in conds]),
                torch.tensor([cond.ctx for cond in conds]),
                torch.tensor([cond.batch for cond in conds]),
                n_steps=n_steps,
                sampler=sampler,
                guidance_scale=guidance_scale,
                generator=gen,
                use_ema=use_ema,
            )
            out.extend(x.cpu().numpy().reshape(len(chunk), s, -1))
        return out

    def _assemble(self, conditions, jobs, cells, n_populations, pert_key, ctx_key, batch_key, uns) -> AnnData:
        by_pop: dict[tuple[int, int], list[np.ndarray]] = {}
        for (ci, pop, _), x in zip(jobs, cells, strict=True):
            by_pop.setdefault((ci, pop), []).append(x)
        blocks, meta = [], {"pert": [], "ctx": [], "batch": [], "population": []}
        for ci, cond in enumerate(conditions):
            for pop in range(n_populations):
                x = np.concatenate(by_pop[(ci, pop)])[: cond.n]
                blocks.append(x)
                values = {"pert": ci, "ctx": cond.ctx, "batch": cond.batch, "population": pop}
                for name, value in values.items():
                    meta[name].extend([value] * cond.n)
        obs = pd.DataFrame(index=[f"perturbdiff_{i}" for i in range(len(meta["population"]))])
        # Registered labels keep their registry order; combinations never registered follow as requested.
        order = sorted(range(len(conditions)), key=lambda i: (conditions[i].code < 0, conditions[i].code, i))
        labels = list(dict.fromkeys(conditions[i].label for i in order))  # keeps the user's value types
        obs[pert_key] = pd.Categorical.from_codes(
            [labels.index(conditions[i].label) for i in meta["pert"]], categories=labels
        )
        for key, reg, codes in (
            (ctx_key, PDIFF_KEYS.CONTEXT_KEY, meta["ctx"]),
            (batch_key, PDIFF_KEYS.BATCH_KEY, meta["batch"]),
        ):
            if key is None:
                continue
            mapping = self._mapping(reg)
            used = sorted(set(codes))
            obs[key] = pd.Categorical.from_codes([used.index(c) for c in codes], categories=mapping[used])
        obs["population"] = np.asarray(meta["population"], dtype=np.int64)
        var = pd.DataFrame(index=self.var_names.copy())
        out = AnnData(X=np.concatenate(blocks).astype(np.float32), obs=obs, var=var)
        out.uns["perturbdiff"] = uns
        return out


class _Condition(NamedTuple):
    """One requested (perturbation, context, batch) population."""

    label: str  # perturbation label in the output
    pert: object  # what the module embeds: a registered code, or component codes (combinatorial)
    code: int  # registered perturbation code, -1 for a combination never registered
    ctx: int
    batch: int
    n: int  # cells per population


def _subtract_control_bias(jobs, conditions, cells, regenerated, source) -> list[np.ndarray]:
    """Per condition: subtract the per-gene mean error of the regenerated controls against their control cells."""
    error_sum, n_sets = {}, {}
    for (ci, _, idx), ctrl_generated in zip(jobs, regenerated, strict=True):
        cond = conditions[ci]
        error = ctrl_generated.mean(0) - source.rows(cond.ctx, cond.batch, idx).mean(0)
        error_sum[ci] = error_sum.get(ci, 0.0) + error
        n_sets[ci] = n_sets.get(ci, 0) + 1
    return [
        np.maximum(x - error_sum[ci] / n_sets[ci], 0.0).astype(x.dtype)
        for (ci, _, _), x in zip(jobs, cells, strict=True)
    ]


def _perturbation_tensor(perts: list) -> torch.Tensor:
    """``(B,)`` registered codes, or ``(B, K)`` component codes padded with -1."""
    if not isinstance(perts[0], np.ndarray):
        return torch.tensor(perts)
    out = torch.full((len(perts), max(1, max(len(p) for p in perts))), -1, dtype=torch.long)
    for i, p in enumerate(perts):
        out[i, : len(p)] = torch.from_numpy(p)
    return out


class _ControlSource:
    """Control cells to condition on: the registered ones, or a user's ``control_adata``."""

    def __init__(self, model: PerturbDiff, control_adata: AnnData | None, pert_codes, ctx_codes, batch_codes):
        self.model = model
        self.codes = (pert_codes, ctx_codes, batch_codes)
        self.control_code = model._control_code
        self._pools: dict[tuple[int, int], np.ndarray] = {}
        if control_adata is None:
            self.matrix = model.adata_manager.get_from_registry(PDIFF_KEYS.X_KEY)
            self.user = None
        else:
            self.matrix, self.user = _prepare_control_adata(model, control_adata)

    def batches_for(self, c: int, requested: list[int] | None) -> list[int]:
        if requested is not None:
            return requested
        pert, ctx, batch = self.codes
        if self.user is not None:
            user_batches = self.user["batch"][(self.user["ctx"] == c) | self.user["no_ctx"]]
            found = sorted(set(user_batches[user_batches >= 0].tolist()))
            if found:
                return found
        with_ctrl = sorted(set(batch[(pert == self.control_code) & (ctx == c)].tolist()))
        return with_ctrl or sorted(set(batch[ctx == c].tolist()))

    def pool(self, c: int, b: int) -> np.ndarray:
        if (c, b) not in self._pools:
            if self.user is None:
                rows, _ = control_pool(*self.codes, self.control_code, c, b)
            else:
                ctx, batch = self.user["ctx"], self.user["batch"]
                in_ctx = np.ones_like(ctx, dtype=bool) if self.user["no_ctx"] else ctx == c
                if not in_ctx.any():
                    name = self.model._mapping(PDIFF_KEYS.CONTEXT_KEY)[c]
                    raise ValueError(
                        f"control_adata has no cell of context {name!r} in column "
                        f"{self.model._setup_arg('context_key')!r}; add such control cells or drop "
                        "that column to use all its cells for every context."
                    )
                rows = np.flatnonzero(in_ctx & (batch == b))
                if not len(rows):
                    rows = np.flatnonzero(in_ctx)
            self._pools[(c, b)] = rows
        return self._pools[(c, b)]

    def rows(self, c: int, b: int, idx: np.ndarray) -> np.ndarray:
        x = self.matrix[self.pool(c, b)[idx]]
        return (x.toarray() if sparse.issparse(x) else np.asarray(x)).astype(np.float32)


def _prepare_control_adata(model: PerturbDiff, control_adata: AnnData):
    """Gene-aligned expression of the user's control cells and their context/batch codes (-1 = unknown)."""
    if not isinstance(control_adata, AnnData):
        raise TypeError(f"control_adata must be an AnnData; got {type(control_adata).__name__}.")
    genes = model.var_names
    overlap = genes.intersection(control_adata.var_names)
    if len(overlap) == 0:
        raise ValueError(
            "control_adata shares no gene with the training data (compare control_adata.var_names "
            f"with model.var_names, e.g. {list(genes[:3])}); use the same gene identifiers."
        )
    if len(overlap) < len(genes):
        missing = genes.difference(control_adata.var_names)
        raise ValueError(
            f"control_adata lacks {len(missing)} of the {len(genes)} training genes (e.g. "
            f"{list(missing[:5])}); subset or pad it to model.var_names."
        )
    if not control_adata.var_names.is_unique:
        raise ValueError("control_adata.var_names has duplicates; run control_adata.var_names_make_unique().")
    layer = model._setup_arg("layer") or model._setup_arg("rna_layer")
    if layer is not None and layer not in control_adata.layers:
        raise KeyError(f"control_adata has no layer {layer!r}, the layer the model was set up with.")
    cols = control_adata.var_names.get_indexer(genes)
    matrix = (control_adata.X if layer is None else control_adata.layers[layer])[:, cols]
    check_log_normalised(matrix, "control_adata expression")
    obs = control_adata.obs
    keep = np.ones(control_adata.n_obs, dtype=bool)
    pert_key = model._setup_arg("perturbation_key")
    if pert_key in obs.columns:
        keep = (obs[pert_key].astype(str) == str(model._setup_arg("control_value"))).to_numpy()
        if not keep.any():
            raise ValueError(
                f"control_adata.obs[{pert_key!r}] has no cell equal to the control value "
                f"{model._setup_arg('control_value')!r}."
            )
    codes = {}
    for name, setup_key, reg in (
        ("ctx", "context_key", PDIFF_KEYS.CONTEXT_KEY),
        ("batch", "batch_key", PDIFF_KEYS.BATCH_KEY),
    ):
        key = model._setup_arg(setup_key)
        mapping = [str(v) for v in model._mapping(reg)]
        if key is not None and key in obs.columns:
            codes[name] = np.array([mapping.index(v) if v in mapping else -1 for v in obs[key].astype(str)])[keep]
        else:
            codes[name] = np.full(int(keep.sum()), -1)
    codes["no_ctx"] = model._setup_arg("context_key") not in obs.columns
    rows = np.flatnonzero(keep)
    return matrix[rows], codes


def _check_same_genes(adata, saved_genes) -> None:
    """The genes of ``adata`` (its RNA modality for MuData) must equal the saved training genes, in order."""
    if isinstance(saved_genes, dict):
        mods = getattr(adata, "mod", {})
        pairs = [(np.asarray(v), mods[k].var_names) for k, v in saved_genes.items() if k in mods]
    else:
        pairs = [(np.asarray(saved_genes), adata.var_names)]
    for expected, got in pairs:
        if len(expected) != len(got) or not np.array_equal(expected.astype(str), np.asarray(got).astype(str)):
            first = next(
                (i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if str(a) != str(b)),
                min(len(expected), len(got)),
            )
            raise ValueError(
                f"The AnnData has {len(got)} genes but the model was trained on {len(expected)}, or in another order "
                f"(first difference at position {first}). Subset and order it with adata[:, saved_genes] where "
                "saved_genes are the training genes (PerturbDiff.load_registry / model.var_names)."
            )


def _check_setup_inputs(
    adata: AnnData,
    obs: pd.DataFrame,
    perturbation_key,
    control_value,
    context_key,
    batch_key,
    matrix,
    where: str,
    combination_delimiter: str | None = None,
) -> None:
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"The AnnData is empty ({adata.n_obs} cells x {adata.n_vars} genes).")
    if getattr(adata, "is_view", False):
        raise ValueError(
            "The AnnData is a view (e.g. adata[mask]); setup would have to modify its parent. Make it "
            "an object of its own first: adata = adata[mask].copy()."
        )
    if getattr(adata, "isbacked", False):
        raise ValueError(
            "Backed AnnData is not supported (set sampling needs random access in a fixed order); load "
            "it into memory with adata.to_memory() or anndata.read_h5ad(path) without backed=."
        )
    for key, arg in ((perturbation_key, "perturbation_key"), (context_key, "context_key"), (batch_key, "batch_key")):
        check_obs_column(obs, key, arg)
    check_control_value(obs[perturbation_key], control_value, perturbation_key)
    n_perturbed = int((obs[perturbation_key].astype(str) != str(control_value)).sum())
    if n_perturbed == 0:
        raise ValueError(
            f"Every cell of {perturbation_key!r} is the control {control_value!r}; PerturbDiff needs "
            "perturbed cells to learn from."
        )
    check_delimiter(combination_delimiter)
    check_labels(pd.unique(obs[perturbation_key].astype(str)), combination_delimiter, control_value, perturbation_key)
    check_log_normalised(matrix, where)


def _check_predict_args(n_cells, n_populations, guidance_scale, n_steps, n_timesteps, sampler, batch_size):
    """Validate the numeric options of ``predict_population``; return the counts as ints."""
    if not isinstance(guidance_scale, int | float | np.number) or not np.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0 (0 = no guidance); got {guidance_scale!r}.")
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"sampler must be 'ddim' or 'ddpm'; got {sampler!r}.")
    return (
        None if n_cells is None else positive_int(n_cells, "n_cells", allow_none=True),
        positive_int(n_populations, "n_populations"),
        positive_int(n_steps, "n_steps", upper=n_timesteps, upper_name="n_timesteps"),
        positive_int(batch_size, "batch_size"),
    )


def _as_list(values, name: str) -> list:
    if isinstance(values, str | int | bool | np.integer) or not isinstance(values, Sequence | np.ndarray | pd.Index):
        return [values]
    if len(values) == 0:
        raise ValueError(f"{name} is empty; give at least one value (or None for all, where allowed).")
    return list(values)
