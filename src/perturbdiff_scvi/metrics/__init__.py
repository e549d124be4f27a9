"""Evaluation metrics (numpy/scipy/scanpy only)."""

from ._basic import energy_distance, pearson_delta, top_de_genes

__all__ = ["energy_distance", "pearson_delta", "top_de_genes"]
