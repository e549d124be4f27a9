"""What the model has learned, as AnnData scanpy can plot: covariate embeddings and population representations.

:class:`EmbeddingMixin` gives :class:`~perturbdiff_scvi.PerturbDiff` three read-only methods. Each returns a new
AnnData with one row per perturbation, context or population (``obs``) and one column per embedding dimension
(``var_names`` ``dim_0, dim_1, ...``), so ``sc.pp.pca(emb); sc.pl.pca(emb, color=...)`` or
``sc.pp.neighbors(emb); sc.tl.umap(emb)`` work directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from .._validation import (
    MissingKeyError,
    as_list,
    check_log_normalised,
    dense_rows,
    expression_matrix,
    optional_seed,
    positive_int,
)
from ._controls import ControlSource
from ._predict import perturbation_tensor, resolve_perturbation
from ._registry import Registry


def _embedding_adata(x: torch.Tensor | np.ndarray, obs: pd.DataFrame, uns: dict) -> AnnData:
    x = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
    var = pd.DataFrame(index=pd.Index([f"dim_{i}" for i in range(x.shape[1])]))
    out = AnnData(X=x, obs=obs, var=var)
    out.uns["perturbdiff_embedding"] = uns
    return out


def network(module, use_ema: bool):
    """The EMA copy or the raw denoiser of ``module``."""
    if not isinstance(use_ema, bool | np.bool_):
        raise ValueError(f"use_ema must be True or False; got {use_ema!r}.")
    return module.ema if use_ema else module.denoiser


class EmbeddingMixin:
    """Embeddings of a trained :class:`~perturbdiff_scvi.PerturbDiff` (covariates and cell populations).

    Each method checks that the model is trained and calls the function of the same job with the model's
    ``(module, registry)``: :func:`perturbation_embedding`, :func:`context_embedding`, :func:`population_embedding`.
    """

    @torch.inference_mode()
    def get_perturbation_embedding(
        self, perturbations: str | Sequence[str] | None = None, *, use_ema: bool = True
    ) -> AnnData:
        """The learned perturbation embedding: the output of the denoiser's perturbation branch.

        This is the ``n_cov``-wide vector a perturbation contributes to the class embedding, before it is
        concatenated with the context and batch embeddings: a row of the lookup table (default setup); the sum
        of its components' rows with ``combination_delimiter`` (the control: 0); the feature encoder applied to
        its feature rows (and summed) with ``perturbation_features``.

        Parameters
        ----------
        perturbations
            Perturbations to embed; ``None`` = every perturbation label with training cells (registry order,
            the control included) followed, with ``combination_delimiter`` or ``perturbation_features``, by every
            component (feature-table row) that is not itself such a label. A combination never measured (e.g.
            ``"A+B"``) or, with ``perturbation_features``, a perturbation never seen but in the table, may be
            named.
        use_ema
            Use the EMA weights (as prediction does by default).

        Returns
        -------
        AnnData with one row per perturbation (``obs_names`` = names; ``obs["kind"]`` = ``"label"`` or
        ``"component"``, ``obs["n_components"]``, ``obs["in_training"]``: the label has training cells or the
        component occurs in a label that has) and ``n_cov`` columns.

        Examples
        --------
        >>> emb = model.get_perturbation_embedding()
        >>> sc.pp.pca(emb, n_comps=2)
        >>> sc.pl.pca(emb, color="in_training", annotate_var_explained=True)
        >>> model.get_perturbation_embedding(["A", "A+B"]).to_df()
        """
        self._check_if_trained(warn=True)
        return perturbation_embedding(self.module, self.registry_view, perturbations, use_ema=use_ema)

    @torch.inference_mode()
    def get_context_embedding(
        self, *, covariate: Literal["context", "batch"] = "context", use_ema: bool = True
    ) -> AnnData:
        """The learned embedding of each context (or batch): a row of the denoiser's lookup table.

        Parameters
        ----------
        covariate
            ``"context"`` (the ``context_key`` categories) or ``"batch"`` (the ``batch_key`` categories).
            Without that key at setup there is one category, ``"all"``.
        use_ema
            Use the EMA weights (as prediction does by default).

        Returns
        -------
        AnnData with one row per registered category (``obs_names``; ``obs["n_cells"]`` and
        ``obs["n_control_cells"]`` in the training data) and ``n_cov`` columns.

        Examples
        --------
        >>> emb = model.get_context_embedding()
        >>> sc.pp.pca(emb, n_comps=2)
        >>> sc.pl.pca(emb, annotate_var_explained=True)
        >>> model.get_context_embedding(covariate="batch").to_df()
        """
        if covariate not in ("context", "batch"):
            raise ValueError(f"covariate must be 'context' or 'batch'; got {covariate!r}.")
        self._check_if_trained(warn=True)
        return context_embedding(self.module, self.registry_view, covariate=covariate, use_ema=use_ema)

    @torch.inference_mode()
    def get_population_embedding(
        self,
        adata: AnnData | None = None,
        *,
        groupby: str | Sequence[str] | None = None,
        groups: Sequence | None = None,
        layer: str | None = None,
        set_size: int | None = None,
        timestep: int | None = None,
        seed: int | None = 0,
        batch_size: int = 16,
        use_ema: bool = True,
    ) -> AnnData:
        """The denoiser's set representation of each population of cells (observed or predicted).

        For each population (the cells sharing the values of ``groupby``), the cells are shuffled and cut into
        sets of ``set_size`` (the last set filled up by drawing again from the population); each set is noised to
        the low ``timestep`` (``x_t = sqrt(abar_t) x / input_scale + sqrt(1 - abar_t) eps``) and passed through the
        denoiser **without covariates** (the null embedding of classifier-free guidance, so the representation
        depends on the cells, not on their labels; a predicted and an observed population are embedded alike),
        with a draw of registered control cells of the population's context and batch in the control stream
        (the most common ones among its cells, read from the setup's ``context_key`` / ``batch_key`` columns
        when ``adata`` has them; otherwise the same widening as prediction: other batches, then all controls).
        The embedding is the mean over the set's cells of the cell tokens after the last joint-attention block
        (width ``n_hidden``, before the output layer), averaged over the population's sets.

        Parameters
        ----------
        adata
            Cells to embed with every training gene (reordered by name), e.g. the output of
            :meth:`predict_population`, real held-out cells or both concatenated; ``None`` = the registered
            training cells.
        groupby
            Obs column(s) defining a population; ``None`` = the setup's perturbation, context and batch keys that
            are columns of ``adata``.
        groups
            Populations to keep (values of ``groupby``; tuples for several columns); ``None`` = all.
        layer
            Layer of ``adata`` with log-normalised expression; ``None`` = ``adata.X`` (with ``adata=None``: the
            layer registered at setup).
        set_size
            Cells per set; ``None`` = the model's ``set_size``.
        timestep
            Diffusion timestep of the noising, 0 to ``n_timesteps - 1``; ``None`` = ``n_timesteps // 50`` (20 of
            1000: ``abar`` about 0.99 with the linear schedule).
        seed
            Seed of the shuffling, the control draws and the noise; the same seed gives the same embedding.
        batch_size
            Sets per forward pass.
        use_ema
            Use the EMA weights (as prediction does by default).

        Returns
        -------
        AnnData with one row per population (``obs`` = the ``groupby`` columns, categorical, plus ``n_cells``;
        ``obs_names`` = the values joined by ``"|"``), ``n_hidden`` columns, and the settings in
        ``uns["perturbdiff_embedding"]``.

        Examples
        --------
        >>> pred = model.predict_population(["A", "B"], n_cells=200, seed=0)
        >>> both = anndata.concat({"real": held_out, "generated": pred}, label="source")
        >>> emb = model.get_population_embedding(both, groupby=["condition", "source"])
        >>> sc.pp.pca(emb, n_comps=2)
        >>> sc.pl.pca(emb, color=["condition", "source"])
        """
        self._check_if_trained(warn=True)
        return population_embedding(
            self.module,
            self.registry_view,
            adata,
            groupby=groupby,
            groups=groups,
            layer=layer,
            set_size=set_size,
            timestep=timestep,
            seed=seed,
            batch_size=batch_size,
            use_ema=use_ema,
        )


def perturbation_embedding(module, registry: Registry, perturbations=None, *, use_ema: bool = True) -> AnnData:
    """:meth:`~perturbdiff_scvi.PerturbDiff.get_perturbation_embedding` of ``module`` with ``registry``."""
    net = network(module, use_ema)
    pert_key = registry.perturbation_key
    pert_codes = registry.codes[0]
    vocab = registry.vocabulary
    names, kinds, n_parts, trained, vectors = [], [], [], [], []
    if perturbations is None:
        labels = [v for i, v in enumerate(registry.categories("perturbation")) if np.any(pert_codes == i)]
    else:
        labels = as_list(perturbations, "perturbations")
    for value in labels:
        label, pert, code = resolve_perturbation(registry, value, pert_codes, pert_key)
        vectors.append(net.cov_embed.embed_perturbation(perturbation_tensor([pert])))
        names.append(str(label))
        kinds.append("label")
        n_parts.append(int(np.size(pert)) if vocab is not None else int(code != registry.control_code))
        trained.append(bool(code >= 0 and np.any(pert_codes == code)))
    if perturbations is None and vocab is not None:
        seen = vocab.seen_components(pert_codes)
        extra = [(i, c) for i, c in enumerate(vocab.components) if c not in set(names)]
        if extra:
            vectors.append(net.cov_embed.embed_perturbation(torch.tensor([[i] for i, _ in extra])))
            names.extend(c for _, c in extra)
            kinds.extend(["component"] * len(extra))
            n_parts.extend([1] * len(extra))
            trained.extend(c in seen for _, c in extra)
    if len(set(names)) != len(names):
        raise ValueError(f"perturbations names a perturbation twice: {names}.")
    obs = pd.DataFrame(
        {"kind": pd.Categorical(kinds), "n_components": n_parts, "in_training": trained},
        index=pd.Index(names),
    )
    uns = {"what": "perturbation", "use_ema": bool(use_ema), "perturbation_key": str(pert_key)}
    return _embedding_adata(torch.cat(vectors), obs, uns)


def context_embedding(module, registry: Registry, *, covariate: str = "context", use_ema: bool = True) -> AnnData:
    """:meth:`~perturbdiff_scvi.PerturbDiff.get_context_embedding` of ``module`` with ``registry``."""
    net = network(module, use_ema)
    table = (net.cov_embed.context if covariate == "context" else net.cov_embed.batch).weight
    pert, ctx, batch = registry.codes
    codes = ctx if covariate == "context" else batch
    names = [str(v) for v in registry.categories(covariate)]
    is_ctrl = pert == registry.control_code
    obs = pd.DataFrame(
        {
            "n_cells": [int(np.sum(codes == i)) for i in range(len(names))],
            "n_control_cells": [int(np.sum((codes == i) & is_ctrl)) for i in range(len(names))],
        },
        index=pd.Index(names),
    )
    key = registry.setup_arg(f"{covariate}_key")
    uns = {"what": covariate, "use_ema": bool(use_ema), f"{covariate}_key": str(key)}
    return _embedding_adata(table, obs, uns)


def population_embedding(
    module,
    registry: Registry,
    adata: AnnData | None = None,
    *,
    groupby: str | Sequence[str] | None = None,
    groups: Sequence | None = None,
    layer: str | None = None,
    set_size: int | None = None,
    timestep: int | None = None,
    seed: int | None = 0,
    batch_size: int = 16,
    use_ema: bool = True,
) -> AnnData:
    """:meth:`~perturbdiff_scvi.PerturbDiff.get_population_embedding` of ``module`` with ``registry``."""
    net = network(module, use_ema)
    seed = optional_seed(seed)
    n_timesteps = module.diffusion.n_timesteps
    timestep = max(0, n_timesteps // 50) if timestep is None else timestep
    if isinstance(timestep, bool) or not isinstance(timestep, int | np.integer) or not 0 <= timestep < n_timesteps:
        raise ValueError(
            f"timestep must be an integer from 0 to n_timesteps - 1 = {n_timesteps - 1}; got {timestep!r}."
        )
    set_size = module.set_size if set_size is None else positive_int(set_size, "set_size")
    batch_size = positive_int(batch_size, "batch_size")
    matrix, obs = population_cells(registry, adata, layer)
    keys = population_keys(registry, obs, groupby)
    members = population_members(obs, keys, groups)
    source = ControlSource(registry)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    jobs = []  # (population, cell rows, control rows in the matrix of source)
    for p, (_, rows) in enumerate(members):
        c, b = (modal_code(registry, obs, rows, what) for what in ("context", "batch"))
        pool = source.pool(c, b)
        order = rng.permutation(rows)
        n_sets = math.ceil(len(order) / set_size)
        order = np.concatenate([order, rng.choice(rows, n_sets * set_size - len(order))])
        for s in range(n_sets):
            jobs.append((p, order[s * set_size : (s + 1) * set_size], pool[rng.choice(len(pool), set_size)]))
    device = next(net.parameters()).device
    pooled = np.zeros((len(members), module.denoiser.final.linear.in_features), dtype=np.float64)
    n_sets = np.zeros(len(members))
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        x0 = torch.from_numpy(np.stack([dense_rows(matrix, rows, np.float32) for _, rows, _ in chunk]))
        x_ctrl = torch.from_numpy(np.stack([dense_rows(source.matrix, ctrl, np.float32) for _, _, ctrl in chunk]))
        noise = torch.randn(x0.shape, generator=gen)
        b = len(chunk)
        t = torch.full((b,), int(timestep), dtype=torch.long, device=device)
        x_t = module.diffusion.q_sample((x0 / module.input_scale).to(device), t, noise.to(device))
        zeros = torch.zeros(b, dtype=torch.long, device=device)
        drop = torch.ones(b, dtype=torch.bool, device=device)
        h, _ = net.encode(x_t, t, (x_ctrl / module.input_scale).to(device), zeros, zeros, zeros, None, drop)
        for (p, _, _), vec in zip(chunk, h.float().mean(1).cpu().numpy(), strict=True):
            pooled[p] += vec
            n_sets[p] += 1
    out_obs = pd.DataFrame(
        {k: pd.Categorical([g[i] for g, _ in members]) for i, k in enumerate(keys)},
        index=pd.Index(["|".join(str(v) for v in g) for g, _ in members]),
    )
    out_obs["n_cells"] = [len(rows) for _, rows in members]
    uns = {
        "what": "population",
        "groupby": list(keys),
        "timestep": int(timestep),
        "set_size": int(set_size),
        "seed": "None" if seed is None else int(seed),
        "use_ema": bool(use_ema),
    }
    return _embedding_adata(pooled / n_sets[:, None], out_obs, uns)


# ---------------------------------------------------------------------- helpers of population_embedding
def population_cells(registry: Registry, adata: AnnData | None, layer: str | None):
    """The expression matrix (training genes, in order) and obs of the cells to embed."""
    if adata is None:
        if layer is not None:
            raise ValueError("layer= applies to a given adata; with adata=None the registered layer is used.")
        obs = registry.adata.obs
        return registry.matrix, obs
    if not isinstance(adata, AnnData):
        raise TypeError(f"adata must be an AnnData (or None for the training cells); got {type(adata).__name__}.")
    if adata.n_obs == 0:
        raise ValueError("adata has no cells.")
    genes = registry.var_names
    missing = genes.difference(adata.var_names)
    if len(missing):
        raise ValueError(
            f"adata lacks {len(missing)} of the {len(genes)} training genes (e.g. {list(missing[:5])}); "
            "subset or pad it to model.var_names."
        )
    if not adata.var_names.is_unique:
        raise ValueError("adata.var_names has duplicates; run adata.var_names_make_unique().")
    matrix = expression_matrix(adata, layer)[:, adata.var_names.get_indexer(genes)]
    check_log_normalised(matrix, "adata expression")
    return matrix, adata.obs


def population_keys(registry: Registry, obs: pd.DataFrame, groupby) -> list[str]:
    """The obs columns that define a population: ``groupby``, else the setup keys that are columns of ``obs``."""
    if groupby is None:
        keys = [registry.perturbation_key, registry.context_key, registry.batch_key]
        keys = [k for k in keys if k is not None and k in obs.columns]
        if not keys:
            raise MissingKeyError(
                f"adata.obs has none of the setup's perturbation, context or batch columns (perturbation: "
                f"{registry.perturbation_key!r}); pass groupby= naming the obs column(s) that define a population."
            )
        return keys
    keys = [str(k) for k in as_list(groupby, "groupby")]
    for key in keys:
        if key not in obs.columns:
            raise MissingKeyError(
                f"groupby column {key!r} is not a column of adata.obs (available: {list(obs.columns)[:20]})."
            )
    if len(set(keys)) != len(keys):
        raise ValueError(f"groupby names a column twice: {keys}.")
    return keys


def population_members(obs: pd.DataFrame, keys: list[str], groups) -> list[tuple[tuple, np.ndarray]]:
    """``[(group values, row positions)]`` in group order, restricted to ``groups``."""
    grouped = obs.reset_index(drop=True).groupby(keys, observed=True, sort=True).indices
    members = [((g,) if not isinstance(g, tuple) else g, np.asarray(r)) for g, r in grouped.items()]
    if not members:
        raise ValueError(f"No cell has values in every groupby column {keys}.")
    if groups is None:
        return members
    wanted = [tuple(str(v) for v in (g if isinstance(g, tuple) else (g,))) for g in as_list(groups, "groups")]
    by_name = {tuple(str(v) for v in g): (g, r) for g, r in members}
    unknown = [w for w in wanted if w not in by_name]
    if unknown:
        known = [k if len(k) > 1 else k[0] for k in by_name]
        shown = [u if len(u) > 1 else u[0] for u in unknown]
        raise ValueError(
            f"Unknown group(s) {shown} of groupby {keys}: no cell has those values. Known groups: {known[:20]}"
            f"{' ...' if len(known) > 20 else ''}"
        )
    return [by_name[w] for w in dict.fromkeys(wanted)]


def modal_code(registry: Registry, obs: pd.DataFrame, rows: np.ndarray, what: str) -> int:
    """Registered code of the most common value of the setup's context or batch column among ``rows`` (-1: none)."""
    key = registry.setup_arg(f"{what}_key")
    if key is None:
        return 0  # one category
    if key not in obs.columns:
        return -1
    mapping = {str(v): i for i, v in enumerate(registry.categories(what))}
    values = obs[key].iloc[rows].astype(str).map(mapping).dropna()
    return int(values.mode().iloc[0]) if len(values) else -1
