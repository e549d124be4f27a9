"""PerturbDiff: the user-facing scvi-tools model. Thin: each job lives in its own room of this package.

- presets and defaults: ``_presets.py``; registration checks and fields: ``_setup.py``;
- training schedule and Ctrl+C recovery: ``_train.py``; the optimisation: ``_training_plan.py``;
- atomic save and validated load: ``_io.py``;
- prediction (conditions, ``Job`` plan, sampling, assembly): ``_predict.py``; control cells: ``_controls.py``;
- embeddings of perturbations, contexts and populations (``get_*_embedding``): ``_embeddings.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import pandas as pd
import rich.pretty  # noqa: F401  (scvi 1.4.2 + rich>=15: view_anndata_setup needs it imported)
import torch
from anndata import AnnData
from scvi.data import AnnDataManager
from scvi.model.base import BaseModelClass
from scvi.train import TrainRunner
from scvi.utils import setup_anndata_dsp

from .._compat import devices_dsp
from .._constants import PDIFF_KEYS
from .._perturbation_features import FeatureVocabulary, check_perturbation_features
from .._validation import optional_seed
from ..data import SetDataSplitter
from ..module import PerturbDiffModule
from . import _io, _predict, _ranges, _setup, _train
from ._auto_guidance import reference_shifts
from ._embeddings import EmbeddingMixin
from ._options import REMOVED_OPTIONS, DiffusionOptions, OutputOptions, SamplerOptions, split_deprecated
from ._presets import DEFAULT_GUIDANCE_SCALE, check_hyperparameters
from ._registry import Registry
from ._training_plan import DiffusionTrainingPlan

if TYPE_CHECKING:
    from mudata import MuData

logger = logging.getLogger(__name__)
#: Largest reference-response table (float32 values) that ``DiffusionOptions(reference_shift=True)`` builds.
MAX_REFERENCE_VALUES = 250_000_000


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
    n_cov
        Width of each covariate embedding (perturbation, context, batch).
    options
        Research options (diffusion schedule, loss weights, preconditioning, guidance dropout, EMA):
        :class:`~perturbdiff_scvi.model.DiffusionOptions`; ``None`` = its defaults, the measured small-data
        defaults. ``PerturbDiff(adata, **PAPER_CONFIG)`` gives the released sizes and options.
    **deprecated_options
        The options' fields as flat keywords (``input_scale=``, ``p_drop_cond=``, ...), as in 0.1.0: accepted for
        one release with a ``FutureWarning``; pass ``options=DiffusionOptions(...)`` instead.

    Examples
    --------
    >>> import perturbdiff_scvi as pdiff
    >>> adata = pdiff.datasets.kang2018()
    >>> train = adata[~((adata.obs.cell_type == "CD4T") & (adata.obs.condition == "stimulated"))].copy()
    >>> pdiff.PerturbDiff.setup_anndata(train, perturbation_key="condition", control_value="control",
    ...                                 context_key="cell_type")
    >>> model = pdiff.PerturbDiff(train)
    >>> wider = pdiff.PerturbDiff(train, n_hidden=256, options=pdiff.model.DiffusionOptions(input_scale="auto"))
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
        n_cov: int = 64,
        options: DiffusionOptions | None = None,
        **deprecated_options,
    ):
        super().__init__(adata)
        options = split_deprecated(
            deprecated_options,
            {"options": (DiffusionOptions, options)},
            where="PerturbDiff()",
            removed=REMOVED_OPTIONS,
        )["options"]
        matrix = lambda: self.adata_manager.get_from_registry(PDIFF_KEYS.X_KEY)  # read only for "auto" values
        # resolved before init_params_ records the options, so that save / load keep the floats
        input_scale = _ranges.input_scale_value(options.input_scale, matrix)
        # resolved and stored as a float with the EDM preconditioning; unused (1.0) otherwise. An invalid value
        # reads no data: check_hyperparameters below rejects it.
        sigma_data = options.sigma_data
        if options.preconditioning == "edm":
            sigma_data = _ranges.sigma_data_value(sigma_data, input_scale, matrix)
        elif isinstance(sigma_data, str):
            sigma_data = 1.0
        options = dataclasses.replace(options, input_scale=input_scale, sigma_data=sigma_data)
        sizes = {"set_size": set_size, "n_hidden": n_hidden, "depth": depth, "n_heads": n_heads, "n_cov": n_cov}
        hparams = check_hyperparameters(**sizes, **dataclasses.asdict(options))
        ss = self.summary_stats
        vocab = self.registry_view.vocabulary
        reference = None
        if hparams.pop("reference_shift"):  # the leave-each-context-out reference responses of the training cells
            n_labels, n_ctx = ss[f"n_{PDIFF_KEYS.PERT_KEY}"], ss[f"n_{PDIFF_KEYS.CONTEXT_KEY}"]
            if n_labels * n_ctx * ss.n_vars > MAX_REFERENCE_VALUES:
                raise ValueError(
                    f"reference_shift=True needs a table of {n_labels} perturbations x {n_ctx} contexts x "
                    f"{ss.n_vars} genes ({n_labels * n_ctx * ss.n_vars * 4 / 1e9:.1f} GB), more than the "
                    f"{MAX_REFERENCE_VALUES * 4 / 1e9:.1f} GB allowed; use fewer genes or reference_shift=False."
                )
            reference = torch.from_numpy(reference_shifts(self.registry_view, n_labels, n_ctx))
        self.module = self._module_cls(
            n_genes=ss.n_vars,
            n_perturbations=ss[f"n_{PDIFF_KEYS.PERT_KEY}"] if vocab is None else len(vocab.components),
            n_contexts=ss[f"n_{PDIFF_KEYS.CONTEXT_KEY}"],
            n_batches=ss[f"n_{PDIFF_KEYS.BATCH_KEY}"],
            perturbation_components=None if vocab is None else torch.from_numpy(vocab.matrix),
            perturbation_features=(
                torch.from_numpy(vocab.features.to_numpy(copy=True)) if isinstance(vocab, FeatureVocabulary) else None
            ),
            reference_shift=reference,
            **hparams,
        )
        n_params = sum(p.numel() for p in self.module.denoiser.parameters())
        self._model_summary_string = (
            f"PerturbDiff: {ss.n_vars} genes, set_size={set_size}, n_hidden={n_hidden}, depth={depth}, "
            f"n_heads={n_heads}, T={hparams['n_timesteps']}, {n_params / 1e6:.2f}M parameters"
            + ("" if vocab is None else f", {len(vocab.components)} perturbation components")
            + (f" from {vocab.features.shape[1]} features" if isinstance(vocab, FeatureVocabulary) else "")
        )
        # what load() replays: the sizes and the resolved options as a plain dict (scvi-tools stores init_params_)
        self.init_params_ = {"kwargs": {}, "non_kwargs": {**sizes, "options": dataclasses.asdict(options)}}

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
    @property
    def registry_view(self) -> Registry:
        """What setup registered, as a frozen :class:`~perturbdiff_scvi.model.Registry` (keys, categories, control
        code, vocabulary, genes, training statistics): built once per registered AnnData and kept with the model.

        Prediction, control cells, counts and embeddings read this instead of the model. Its training statistics
        (per-gene maximum, realistic zero threshold) are computed on first use and not saved: a loaded model
        recomputes them from the AnnData it is loaded with.
        """
        manager = self.adata_manager
        cached = self.__dict__.get("_registry")
        if cached is None or cached[0] is not manager:
            cached = (manager, Registry.from_manager(manager))
            self.__dict__["_registry"] = cached
        return cached[1]

    @property
    def var_names(self) -> pd.Index:
        """Genes the model was trained on, in order."""
        return self.registry_view.var_names

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
        max_epochs, max_steps, sets_per_batch, lr = _train.checked_lengths(max_epochs, max_steps, sets_per_batch, lr)
        compile, compile_kwargs = _train.checked_compile(compile, compile_kwargs)
        splitter = self._data_splitter_cls(
            self.adata_manager,
            self.registry_view.control_code,
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
        if "batch_size" in trainer_kwargs:
            raise TypeError(
                "train() takes sets_per_batch= (cell sets per optimisation step, each of set_size cells and as many "
                "controls), not batch_size=."
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
        seed: int | None = None,
        guidance_scale: float | Literal["auto"] = DEFAULT_GUIDANCE_SCALE,
        n_steps: int | None = None,
        sampler_options: SamplerOptions | None = None,
        output_options: OutputOptions | None = None,
        **deprecated_options,
    ) -> AnnData:
        """Generate cell populations for (perturbation, context, batch) combinations.

        Every requested perturbation is crossed with every requested context and batch. A combination
        never observed together in training works as long as the perturbation and the context were each
        observed. Each population of ``n_cells`` cells is generated as ``ceil(n_cells / set_size)`` sets,
        each conditioned on its own draw of control cells. Counts (``n_cells``, ``n_populations``, ``n_steps``)
        accept whole-number floats such as ``2.0``; anything else raises a ``ValueError`` naming the argument.

        Parameters
        ----------
        perturbations
            Perturbation value(s) of ``perturbation_key``. With ``combination_delimiter`` set at setup, also
            combinations never measured (e.g. ``"KLF1+MAP2K6"``) whose components occur in the training cells;
            with ``perturbation_features``, perturbations never seen whose row is in the table.
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
        seed
            Seed of the control draws and the noise; the same seed gives the same cells.
        guidance_scale
            Classifier-free guidance weight ``w``: ``(1 + w) x0_cond - w x0_uncond``; 0 = no guidance. The
            default 0.5 was measured best for the small default model; the released value is 1.0 (use it with
            ``PAPER_CONFIG``). With weak responses (e.g. CRISPR screens) 0 did better (see the benchmarks).
            ``"auto"`` (not in the released method): per condition, the scale of a grid (0 to 1.5) whose
            predicted response ``|mean(pred) - mean(controls)|`` comes closest to the size of this perturbation's
            response in the training contexts, weighted by how similar their control cells are to this
            context's; the default scale where the perturbation was measured in no context. Each condition
            is probed once per grid scale first (about 10x the sampling time); ``uns["perturbdiff"]
            ["auto_guidance"]`` records the choices.
        n_steps
            Reverse steps of ``"ddim"`` / ``"ddpm"``, strided over the full schedule (1 to ``n_timesteps``);
            ``None`` = 1: one jump from pure noise to the model's clean estimate, which on every benchmark task
            and seed gave more believable cells and better shifts than 50 steps. Not used by
            ``sampler="ddim_truncated"`` (an explicit value raises a ``ValueError``).
        sampler_options
            How the reverse chain runs (sampler, ``start_time``, sets per forward pass, EMA weights, progress
            bar): :class:`~perturbdiff_scvi.model.SamplerOptions`; ``None`` = its defaults.
        output_options
            What is done to the generated cells (value bound, bias correction, shift on PCs, zeros, transport, counts):
            :class:`~perturbdiff_scvi.model.OutputOptions`; ``None`` = its defaults.
        **deprecated_options
            The options' fields as flat keywords (``sampler=``, ``x0_bound=``, ``counts=``, ...), as in 0.1.0:
            accepted for one release with a ``FutureWarning``.

        Returns
        -------
        AnnData with ``var_names`` = training genes, ``obs`` holding the user's perturbation / context /
        batch columns (categorical) and ``population``, the settings in ``uns["perturbdiff"]`` and, with
        ``OutputOptions(counts=True)``, ``layers["counts"]``.

        Examples
        --------
        >>> pred = model.predict_population("stimulated", contexts="CD4T", n_populations=3, seed=0)
        >>> sc.pl.umap(anndata.concat([real, pred], label="source"), color="condition")
        >>> from perturbdiff_scvi.model import OutputOptions, SamplerOptions
        >>> released = model.predict_population("stimulated", contexts="CD4T", guidance_scale=1.0, seed=0,
        ...                                     sampler_options=SamplerOptions(sampler="ddim_truncated"))
        >>> with_counts = model.predict_population("stimulated", contexts="CD4T", seed=0,
        ...                                        output_options=OutputOptions(counts=True))
        >>> with_counts.layers["counts"]  # whole numbers; with_counts.X re-normalised from them
        """
        self._check_if_trained(warn=True)
        groups = split_deprecated(
            deprecated_options,
            {"sampler_options": (SamplerOptions, sampler_options), "output_options": (OutputOptions, output_options)},
            where="predict_population()",
            removed=REMOVED_OPTIONS,
        )
        sampling = _predict.SamplingOptions.checked(
            n_steps=n_steps,
            guidance_scale=guidance_scale,
            options=groups["sampler_options"],
            n_timesteps=self.module.diffusion.n_timesteps,
        )
        return _predict.predict(
            self.module,
            self.registry_view,
            perturbations,
            contexts,
            batches,
            control_adata=control_adata,
            n_cells=n_cells,
            n_populations=n_populations,
            seed=optional_seed(seed),
            sampling=sampling,
            output=groups["output_options"],
        )
