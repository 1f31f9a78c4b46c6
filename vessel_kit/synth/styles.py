"""Style families: named distributions over how a synthetic volume looks.

A ``Style`` holds, for every factor of the rendered image, the range (or the choices, or the
chance) it is drawn from, once per volume (``draw_look``). Intensities are in *units*: the tissue
mean is 0 and one unit is 1000 uint16 levels at ``gain`` 1000 (the ``hipct`` family's scale); the
image is mapped to uint16 at the end as ``level + gain * value`` (``- gain`` when inverted).
Lengths are in voxels unless named ``_um``; densities are per mm³ of tissue.

The families (``STYLES``), each randomised within itself:

* ``hipct``: the original look: smooth 3-scale texture, an organ outline over a flat darker
  medium, each vessel tree a few thousand levels darker or brighter, rings, streaks, mild noise.
* ``wall``: dark lumens inside bright walls (the label is the vessel including its wall), strong
  multi-scale texture in Voronoi regions each with its own texture, bright glomerulus-like blobs
  and flakes, and no outline: the field of view lies wholly inside the organ.
* ``bright``: bright-filled vessels on darker, noisy tissue (poisson-like or speckle noise) over
  a narrow intensity range, like a contrast-perfused micro-CT scan.
* ``faint``: vessels fainter than an anisotropic texture (elongated along one axis), mixed
  polarity per branch, blur, slice-to-slice drift, shading, rings and streaks, sometimes inverted.
* ``random``: every factor drawn from its widest range, independently.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, fields
from types import SimpleNamespace

import numpy as np

from ..values import is_finite_real

Range = tuple[float, float]

POLARITIES = ("bright", "dark", "tree", "branch")  # vessel sign: all bright, all dark, per tree, per branch
NOISE_KINDS = ("gaussian", "poisson", "speckle")  # constant, ~sqrt(signal), ~signal standard deviation


def _factor(default: object, draw: str, options: tuple[str, ...] = ()) -> object:
    """A ``Style`` field: its default (the ``hipct`` value) and how a look draws it."""
    return field(default=default, metadata={"draw": draw, "options": options})


@dataclass(frozen=True)
class Style:
    """A family of looks. Each field is drawn once per volume (``draw_look``):

    ``uniform``/``log`` fields are (low, high) ranges drawn uniformly / log-uniformly, ``int``
    fields inclusive integer ranges, ``choice`` fields tuples of options, ``chance`` fields a
    probability. The defaults are the ``hipct`` family. Invalid values raise ValueError naming
    the field.
    """

    # vessels
    polarity: tuple[str, ...] = _factor(("tree",), "choice", POLARITIES)
    contrast: Range = _factor((3.0, 4.0), "uniform")  # |lumen - tissue|; each tree within ±25 %
    walled: Range = _factor((0.0, 0.0), "uniform")  # the share of trees drawn with a wall
    wall_contrast: Range = _factor((2.0, 5.0), "uniform")  # |wall - tissue|, ±25 %, the lumen's opposite sign
    wall_um: Range = _factor((50.0, 100.0), "uniform")  # wall thickness (at least 0.7 voxel)
    edge_blur: Range = _factor((0.7, 0.7), "uniform")  # partial-volume sigma of the vessel edges
    lumen_texture: Range = _factor((1.0, 1.0), "uniform")  # how much tissue texture shows in a lumen
    # tissue texture: octaves from the finest to the coarsest scale, amplitude ~ scale ** slope
    texture_rms: Range = _factor((2.62, 2.62), "uniform")
    fine_scale: Range = _factor((3.0, 3.0), "log")  # feature size of the finest octave
    coarse_scale: Range = _factor((48.0, 48.0), "log")  # ... and of the coarsest
    octaves: tuple[int, int] = _factor((3, 3), "int")
    slope: Range = _factor((0.47, 0.47), "uniform")
    anisotropy: Range = _factor((1.0, 1.0), "log")  # features stretched along one random axis
    regions: tuple[int, int] = _factor((0, 0), "int")  # Voronoi regions, each its own texture (0: none)
    region_contrast: Range = _factor((0.0, 0.0), "uniform")  # spread of the regions' mean levels
    # particles: glomerulus-like blobs and small flakes, never labelled
    particles: Range = _factor((0.0, 0.0), "uniform")  # blobs per mm³
    particle_um: Range = _factor((100.0, 200.0), "uniform")  # blob diameter
    particle_contrast: Range = _factor((2.0, 5.0), "uniform")
    bright_particles: Range = _factor((1.0, 1.0), "uniform")  # the share of bright blobs and flakes
    flakes: Range = _factor((0.0, 0.0), "uniform")  # flakes per mm³
    # organ and scan
    outline: float = _factor(1.0, "chance")  # an organ outline over a flat medium, else all tissue
    outside: Range = _factor((-9.0, -6.0), "uniform")  # the medium's level
    level: Range = _factor((26_000.0, 29_000.0), "uniform")  # uint16 level of the tissue mean
    gain: Range = _factor((1000.0, 1000.0), "log")  # uint16 levels per unit
    inverted: float = _factor(0.0, "chance")
    psf_blur: Range = _factor((0.0, 0.0), "uniform")  # sigma of a blur of the whole image
    shading: Range = _factor((0.0, 0.0), "uniform")  # amplitude of a smooth additive shading
    drift: Range = _factor((0.0, 0.0), "uniform")  # spread of a slice-to-slice level random walk
    rings: Range = _factor((0.75, 0.75), "uniform")  # mean ring amplitude
    ring_count: tuple[int, int] = _factor((6, 14), "int")
    streaks: Range = _factor((1.4, 1.4), "uniform")  # mean streak amplitude
    streak_count: tuple[int, int] = _factor((2, 5), "int")
    noise: Range = _factor((0.5, 0.5), "log")  # noise standard deviation at the tissue level
    noise_kind: tuple[str, ...] = _factor(("gaussian",), "choice", NOISE_KINDS)

    def __post_init__(self) -> None:
        for spec in fields(self):
            _check_factor(spec.name, getattr(self, spec.name), spec.metadata)


def resolve_style(style: str | Style) -> Style:
    """The ``Style`` named ``style`` in ``STYLES``, or ``style`` itself.

    Raises ValueError for an unknown name, listing the valid ones.
    """
    if isinstance(style, Style):
        return style
    if isinstance(style, str) and style in STYLES:
        return STYLES[style]
    raise ValueError(f"unknown style {style!r}; styles: {sorted(STYLES)}")


def draw_look(style: Style, rng: np.random.Generator) -> SimpleNamespace:
    """One volume's factors, each drawn from ``style``'s field of the same name.

    Every field takes exactly one draw from ``rng``, in field order, so that narrowing one
    factor does not change the others.
    """
    look = {}
    for spec in fields(style):
        value, draw = getattr(style, spec.name), spec.metadata["draw"]
        if draw == "uniform":
            look[spec.name] = float(rng.uniform(*value))
        elif draw == "log":
            look[spec.name] = float(np.exp(rng.uniform(*np.log(value))))
        elif draw == "int":
            look[spec.name] = int(rng.integers(value[0], value[1] + 1))
        elif draw == "choice":
            look[spec.name] = str(value[rng.integers(len(value))])
        else:
            look[spec.name] = bool(rng.uniform() < value)
    return SimpleNamespace(**look)


def _check_factor(name: str, value: object, metadata: dict) -> None:
    """Raise ValueError naming ``Style.<name>`` when ``value`` does not fit its kind of draw."""
    draw, options = metadata["draw"], metadata["options"]
    if draw == "chance":
        valid = is_finite_real(value) and 0 <= value <= 1
        expected = "a probability in [0, 1]"
    elif draw == "choice":
        valid = isinstance(value, tuple) and len(value) > 0 and all(v in options for v in value)
        expected = f"a non-empty tuple of {options}"
    elif draw == "int":
        valid = _is_pair(value, numbers.Integral) and 0 <= value[0] <= value[1]
        expected = "(low, high) ints, 0 <= low <= high"
    else:
        positive = draw == "log"
        valid = _is_pair(value, numbers.Real) and value[0] <= value[1] and (value[0] > 0 or not positive)
        expected = "(low, high) numbers, low <= high" + (", low > 0" if positive else "")
    if not valid:
        raise ValueError(f"Style.{name} must be {expected}, got {value!r}")


def _is_pair(value: object, kind: type) -> bool:
    return (
        isinstance(value, tuple)
        and len(value) == 2
        and all(isinstance(v, kind) and is_finite_real(v) for v in value)  # is_finite_real refuses bools
    )


# The registry comes last: building a Style runs the checks defined above.
STYLES: dict[str, Style] = {
    "hipct": Style(),
    "wall": Style(
        polarity=("dark",), contrast=(3.0, 7.0), walled=(1.0, 1.0), wall_contrast=(3.0, 7.0),
        wall_um=(80.0, 200.0), edge_blur=(0.5, 1.0), lumen_texture=(0.0, 0.3),
        texture_rms=(1.5, 3.5), fine_scale=(1.5, 3.0), coarse_scale=(16.0, 64.0), octaves=(3, 5),
        slope=(0.0, 0.6), anisotropy=(1.0, 1.5), regions=(3, 10), region_contrast=(0.5, 2.0),
        particles=(2.0, 8.0), particle_contrast=(4.0, 8.0), bright_particles=(0.7, 1.0),
        flakes=(2.0, 20.0), outline=0.0, level=(18_000.0, 40_000.0), gain=(700.0, 1500.0),
        psf_blur=(0.0, 0.6), shading=(0.0, 2.0), drift=(0.0, 0.5), rings=(0.0, 1.0),
        streaks=(0.0, 1.5), noise=(0.3, 1.0), noise_kind=("gaussian", "poisson"),
    ),
    "bright": Style(
        polarity=("bright",), contrast=(5.0, 10.0), edge_blur=(0.6, 1.2), lumen_texture=(0.0, 0.5),
        texture_rms=(1.0, 2.5), fine_scale=(2.0, 4.0), coarse_scale=(8.0, 32.0), octaves=(2, 4),
        slope=(0.2, 0.8), regions=(0, 4), region_contrast=(0.0, 1.0), particles=(0.0, 4.0),
        particle_contrast=(1.0, 4.0), bright_particles=(0.2, 0.8), flakes=(0.0, 10.0), outline=0.5,
        outside=(-5.0, -2.0), level=(3_000.0, 50_000.0), gain=(60.0, 250.0), psf_blur=(0.3, 1.0),
        shading=(0.0, 1.5), drift=(0.0, 0.5), rings=(0.0, 0.5), streaks=(0.0, 1.0),
        noise=(1.0, 2.5), noise_kind=("gaussian", "poisson", "speckle"),
    ),
    "faint": Style(
        polarity=("branch", "tree"), contrast=(0.8, 2.5), walled=(0.0, 0.5),
        wall_contrast=(0.8, 2.5), edge_blur=(0.8, 1.6), lumen_texture=(0.5, 1.0),
        texture_rms=(1.5, 3.0), fine_scale=(1.5, 4.0), coarse_scale=(12.0, 48.0), octaves=(2, 4),
        anisotropy=(2.0, 6.0), regions=(0, 6), region_contrast=(0.0, 1.5), particles=(0.0, 3.0),
        bright_particles=(0.3, 1.0), flakes=(0.0, 10.0), outline=0.7, outside=(-9.0, -3.0),
        level=(15_000.0, 45_000.0), gain=(300.0, 1500.0), inverted=0.3, psf_blur=(0.5, 1.3),
        shading=(0.5, 3.0), drift=(0.5, 2.0), rings=(0.3, 1.5), streaks=(1.0, 3.0),
        noise=(0.3, 1.0), noise_kind=("gaussian", "poisson"),
    ),
    "random": Style(
        polarity=POLARITIES, contrast=(0.4, 9.0), walled=(0.0, 1.0), wall_contrast=(0.5, 6.0),
        wall_um=(30.0, 200.0), edge_blur=(0.4, 1.8), lumen_texture=(0.0, 1.0),
        texture_rms=(0.3, 5.0), fine_scale=(1.0, 6.0), coarse_scale=(8.0, 96.0), octaves=(1, 5),
        slope=(-0.3, 1.0), anisotropy=(1.0, 6.0), regions=(0, 12), region_contrast=(0.0, 3.0),
        particles=(0.0, 10.0), particle_um=(80.0, 250.0), particle_contrast=(0.5, 8.0),
        bright_particles=(0.0, 1.0), flakes=(0.0, 30.0), outline=0.5, outside=(-10.0, 10.0),
        level=(2_000.0, 60_000.0), gain=(40.0, 2000.0), inverted=0.5, psf_blur=(0.0, 1.5),
        shading=(0.0, 3.0), drift=(0.0, 2.0), rings=(0.0, 2.0), ring_count=(0, 14),
        streaks=(0.0, 3.0), streak_count=(0, 6), noise=(0.05, 2.5), noise_kind=NOISE_KINDS,
    ),
}
