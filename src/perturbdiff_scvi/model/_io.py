"""Saving and loading: an atomic save, a readable check of the saved file, and the gene check of ``load``."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def atomic_save(write: Callable[[str], None], dir_path: str | os.PathLike, *, overwrite: bool) -> None:
    """Run ``write(tmp_dir)`` into a temporary folder next to ``dir_path``, then rename it into place.

    An interrupted save never leaves a half-written model at ``dir_path``; with ``overwrite=True`` the previous
    model stays intact until the new one is complete.
    """
    target = Path(dir_path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{str(target)!r} already exists; pass overwrite=True or choose another folder.")
    token = uuid.uuid4().hex[:8]
    tmp = target.parent / f".{target.name}.saving-{token}"
    old = target.parent / f".{target.name}.replaced-{token}"
    try:
        write(str(tmp))
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def read_saved_model(dir_path: str | os.PathLike, prefix: str | None, model_name: str):
    """The saved genes of a folder written by ``save``, with clear errors for a missing, corrupt or foreign one."""
    path = Path(dir_path)
    model_file = path / f"{prefix or ''}model.pt"
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
    if saved_name != model_name:
        raise ValueError(f"{str(path)!r} holds a {saved_name} model, not a {model_name}.")
    return saved_genes


def check_same_genes(adata, saved_genes) -> None:
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
