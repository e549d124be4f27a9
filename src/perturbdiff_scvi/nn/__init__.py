"""Reusable layers: the set denoiser and the feature-based perturbation encoder."""

from ._dit import CovariateEmbedder, FinalLayer, JointDiTBlock, SetDiT, TimestepEmbedder
from ._perturbation_encoder import FeatureEncoder

__all__ = ["CovariateEmbedder", "FeatureEncoder", "FinalLayer", "JointDiTBlock", "SetDiT", "TimestepEmbedder"]
