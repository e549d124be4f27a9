"""Bundled real perturbation datasets (no download)."""

from ._datasets import kang2018, kang2018_donors, norman2019

__all__ = ["kang2018", "kang2018_donors", "norman2019"]
