"""FeatureEncoder: a perturbation embedding computed from a feature table instead of looked up.

With ``perturbation_features`` given at setup, the perturbation branch of
:class:`~perturbdiff_scvi.nn.CovariateEmbedder` is this encoder: row ``i`` of a fixed table of numeric features
(e.g. gene embeddings of the targeted gene) goes through a small MLP to the covariate width. It is called
like an ``nn.Embedding`` (integer row codes in, embeddings out), so a combination ``A+B`` is still embedded
as the sum of its components' encodings, and a perturbation never trained on is embedded from its features.
"""

from __future__ import annotations

import torch
from torch import nn


class FeatureEncoder(nn.Module):
    """Integer row codes -> ``MLP(normalised features[code])`` of width ``n_cov``.

    Parameters
    ----------
    features
        ``(n_rows, n_features)`` float table, one row per perturbation (or per component). It is a
        non-persistent buffer: it is not written into the ``state_dict``, because the model keeps the table in its
        setup arguments and rebuilds the encoder from it on load.
    n_cov
        Output width (the covariate width of :class:`~perturbdiff_scvi.nn.CovariateEmbedder`).
    n_hidden
        Width of the MLP's hidden layer; ``None`` = ``n_cov``.

    Notes
    -----
    The table is centred (each column minus its mean over all rows) and divided by one scale, the root mean
    square of the centred table, so that tables on any overall scale train alike while the distances between
    rows keep their proportions (a per-column standardisation would blow up near-constant, uninformative
    columns). Columns on very different scales should be standardised by the user beforehand.
    The MLP is ``Linear(n_features, n_hidden) -> SiLU -> Linear(n_hidden, n_cov)``.

    Examples
    --------
    >>> enc = FeatureEncoder(torch.randn(5, 12), n_cov=8)
    >>> enc(torch.tensor([0, 3])).shape
    torch.Size([2, 8])
    """

    def __init__(self, features: torch.Tensor, n_cov: int, *, n_hidden: int | None = None):
        super().__init__()
        features = torch.as_tensor(features, dtype=torch.float32)
        if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
            raise ValueError(f"features must be a non-empty 2-d table; got shape {tuple(features.shape)}.")
        centred = features - features.mean(0)
        scale = centred.pow(2).mean().sqrt()  # one scale for the whole table: keeps the geometry of the rows
        self.register_buffer("features", centred / scale if scale > 0 else centred, persistent=False)
        self.n_features = features.shape[1]
        hidden = n_hidden or n_cov
        self.mlp = nn.Sequential(nn.Linear(self.n_features, hidden), nn.SiLU(), nn.Linear(hidden, n_cov))

    @property
    def n_rows(self) -> int:
        return self.features.shape[0]

    def forward(self, codes: torch.Tensor) -> torch.Tensor:  # (...,) long -> (..., n_cov)
        return self.mlp(self.features[codes])
