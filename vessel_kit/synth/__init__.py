"""Synthetic vessel volumes with labels, in many looks, and a synthetic Kaggle-layout dataset.

They let the whole pipeline (I/O, training, inference, scoring) run and be tested on a CPU without
the 50 GB competition data, and they are training data: a model trained on one look does not
transfer to scans from other sources, so the image of a volume is drawn from a *style family*
(``STYLES``: ``hipct``, ``wall``, ``bright``, ``faint``, ``random``; see ``styles``), randomised
within itself per volume, beyond what the real scans show (the SynthSeg / vesselFM lesson).

- ``geometry``: branching vessel trees with Murray's-law radii in µm (so a coarser voxel size
  samples the same anatomy more coarsely), their voxel maps, the organ outline, and sparse
  annotation by whole subtrees.
- ``styles``: the ``Style`` distributions and the ``STYLES`` registry.
- ``render``: tissue texture (multi-scale, anisotropic, Voronoi regions), vessels (lumen, wall,
  polarity, partial volume), particles, outline, scan artefacts, noise, uint16 window.
- ``synthesize``: ``make_synthetic_volume``. ``dataset``: ``make_synthetic_dataset``.

Arrays are (Z, Y, X). Labels are the vessels including any wall, never particles or texture.
"""

from .dataset import LOOKS_PER_FAMILY, SYNTHETIC_VOLUMES, SyntheticVolumeSpec, dataset_volume_seed, make_synthetic_dataset
from .styles import STYLES, Style
from .synthesize import make_synthetic_volume

__all__ = [
    "LOOKS_PER_FAMILY",
    "STYLES",
    "SYNTHETIC_VOLUMES",
    "Style",
    "SyntheticVolumeSpec",
    "dataset_volume_seed",
    "make_synthetic_dataset",
    "make_synthetic_volume",
]
