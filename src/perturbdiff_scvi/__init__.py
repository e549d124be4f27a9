"""perturbdiff-scvi: PerturbDiff (functional diffusion over cell populations) as an scvi-tools model.

``import perturbdiff_scvi`` stays light: the model (and scvi-tools, ~10 s to import) loads on first use
of :class:`PerturbDiff`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from . import datasets

try:
    __version__ = version("perturbdiff-scvi")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["PAPER_CONFIG", "PerturbDiff", "baselines", "datasets", "metrics", "pl", "tl"]

_LAZY = {
    "PerturbDiff": "model",
    "PAPER_CONFIG": "model",
    "model": None,
    "module": None,
    "nn": None,
    "diffusion": None,
    "data": None,
    "metrics": None,
    "baselines": None,
    "tl": None,
    "pl": None,
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        sub = importlib.import_module(f".{_LAZY[name] or name}", __name__)
        return getattr(sub, name) if _LAZY[name] else sub
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
