"""Reusable layers: the set denoiser."""

from ._dit import CovariateEmbedder, FinalLayer, JointDiTBlock, SetDiT, TimestepEmbedder

__all__ = ["CovariateEmbedder", "FinalLayer", "JointDiTBlock", "SetDiT", "TimestepEmbedder"]
