"""The only place that imports private scvi-tools names (scvi-tools >=1.4.2,<1.6).

Every name here exists unchanged in 1.4.2 and 1.5.x; a future rename is fixed in this file only.
"""

from __future__ import annotations

from scvi.utils._docstrings import devices_dsp  # docrep processor for accelerator/devices text

__all__ = ["devices_dsp"]
