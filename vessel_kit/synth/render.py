"""Rendering a scene (vessel maps and organ outline) into a uint16 image with a drawn look.

Each layer of the image draws from its own random stream, so a factor switched off or narrowed
leaves every other layer as it was. Values are in units (tissue mean 0, see ``styles``) until
the final mapping to uint16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import cv2
import numpy as np

LAYERS = ("texture", "regions", "vessels", "particles", "shading", "rings", "streaks", "drift", "noise")
REGION_GRID = 2  # Voronoi regions are computed on a grid this many times coarser
BLOB_SIGMA_PER_DIAMETER = 1 / 2.5  # a blob of diameter d is a Gaussian of sigma d / 2.5
PER_ITEM_SPREAD = (0.75, 1.25)  # per tree/ring/streak factor around the volume's drawn value
MAX_PARTICLE_SHARE = 0.01  # at most this many particles per voxel
UINT16_MAX = np.iinfo(np.uint16).max
SATURATED = 0.001  # at most this share of the voxels saturates at either end of the uint16 range


@dataclass(frozen=True)
class Scene:
    """What is drawn: the vessel maps of ``geometry.rasterize``, the organ weight, the trees."""

    owner: np.ndarray  # (Z, Y, X) 1 + branch index, 0 = no vessel
    depth: np.ndarray | None  # (Z, Y, X) float32 voxels below the vessel surface; None: no walls
    organ: np.ndarray | None  # (Z, Y, X) float32 1 inside the organ, 0 outside; None: all organ
    trees: np.ndarray  # (branches,) the tree of each branch


def render_image(
    seed: np.random.SeedSequence, look: SimpleNamespace, scene: Scene, voxel_size_um: float
) -> np.ndarray:
    """The uint16 (Z, Y, X) image of ``scene`` in ``look``: textured tissue with vessels and
    particles, the organ outline over a flat medium, then scan artefacts and noise."""
    rngs = dict(zip(LAYERS, (np.random.default_rng(child) for child in seed.spawn(len(LAYERS))), strict=True))
    shape = scene.owner.shape
    image = _tissue(rngs["texture"], rngs["regions"], look, shape)
    _add_vessels(rngs["vessels"], look, scene, voxel_size_um, image)
    _add_particles(rngs["particles"], look, voxel_size_um, image)
    if scene.organ is not None:
        image -= look.outside
        image *= scene.organ
        image += look.outside
    if look.shading > 0:
        image += smooth_noise(rngs["shading"], shape, [([max(shape) / 2] * 3, look.shading)])
    if look.psf_blur > 0:
        image = blur(image, look.psf_blur)
    image += _rings(rngs["rings"], look, shape)
    _add_streaks(rngs["streaks"], look, image)
    image += _drift(rngs["drift"], look.drift, shape[0])[:, None, None]
    _add_noise(rngs["noise"], look, image)
    gain, level = _window(look, image)
    image *= np.float32(gain)
    image += np.float32(level)
    return np.clip(np.rint(image), 0, UINT16_MAX).astype(np.uint16)


def smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int, int], octaves: list[tuple[list[float], float]]
) -> np.ndarray:
    """A sum of smooth-noise octaves, each ``(cells, amplitude)``: noise of standard deviation
    ``amplitude`` with features about ``cells[axis]`` voxels wide along each axis.

    Each octave is drawn on a grid ``cells`` times coarser than ``shape`` and blurred there.
    Coarse to fine, the sum so far is resized onto the next octave's grid and added, so only the
    finest grid is resized to ``shape``: one full-size resize for any number of octaves.
    """
    grids = [[int(side / max(cell, 1.0)) + 2 for side, cell in zip(shape, cells, strict=True)] for cells, _ in octaves]
    total = None
    for index in np.argsort([np.prod(grid) for grid in grids], kind="stable"):
        noise = blur(rng.standard_normal(grids[index], dtype=np.float32), 0.8)
        noise *= np.float32(octaves[index][1] / max(float(noise.std()), 1e-6))
        if total is not None:
            noise += resize(total, noise.shape)
        total = noise
    return resize(total, shape)


def resize(volume: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """A float32 (Z, Y, X) volume resized to ``shape``: cubic in XY, linear along Z."""
    depth, height, width = shape
    planes = np.empty((len(volume), height, width), dtype=np.float32)
    for plane, out in zip(volume, planes, strict=True):
        cv2.resize(plane, (width, height), dst=out, interpolation=cv2.INTER_CUBIC)
    if len(volume) == depth:
        return planes
    columns = planes.reshape(len(volume), height * width)  # one column per (y, x): resize along z
    return cv2.resize(columns, (height * width, depth), interpolation=cv2.INTER_LINEAR).reshape(shape)


def blur(volume: np.ndarray, sigma: float | tuple[float, float, float]) -> np.ndarray:
    """Separable 3D Gaussian blur of a float32 volume with OpenCV, ``sigma`` one value or one per
    axis (z, y, x; 0 = none): XY per slice, then along z. Returns a new array."""
    sigma_z, sigma_y, sigma_x = (sigma,) * 3 if np.isscalar(sigma) else sigma
    blurred = np.empty_like(volume)
    if sigma_y > 0 or sigma_x > 0:
        for plane, out in zip(volume, blurred, strict=True):
            cv2.GaussianBlur(plane, (0, 0), sigmaX=max(sigma_x, 1e-3), sigmaY=max(sigma_y, 1e-3),
                             dst=out, borderType=cv2.BORDER_REFLECT)
    else:
        blurred[:] = volume
    if sigma_z > 0:
        kernel = cv2.getGaussianKernel(2 * math.ceil(3 * sigma_z) + 1, sigma_z, cv2.CV_32F)
        columns = blurred.reshape(len(volume), -1)
        columns[:] = cv2.sepFilter2D(columns, -1, np.ones((1, 1), np.float32), kernel,
                                     borderType=cv2.BORDER_REFLECT)
    return blurred


def _window(look: SimpleNamespace, image: np.ndarray) -> tuple[float, float]:
    """(gain, level) mapping unit values to uint16: the drawn ones (gain negated when inverted),
    the gain shrunk and the level shifted where needed so that at most ``SATURATED`` of the
    voxels fall outside [0, 65535] at either end, as a scanner's window would."""
    low, high = np.quantile(image.ravel()[::97], [SATURATED, 1 - SATURATED])
    gain = min(look.gain, 0.98 * UINT16_MAX / max(float(high - low), 1e-6))
    gain = -gain if look.inverted else gain
    ends = sorted((look.level + gain * low, look.level + gain * high))
    shift = max(0.0, -ends[0]) - max(0.0, ends[1] - UINT16_MAX)
    return gain, look.level + shift


# --- tissue ---------------------------------------------------------------------------------------


def _tissue(
    texture_rng: np.random.Generator, region_rng: np.random.Generator, look: SimpleNamespace,
    shape: tuple[int, int, int],
) -> np.ndarray:
    """Tissue around level 0: a multi-scale texture or, with regions, Voronoi regions each mixing
    it with a fine grain at their own level and gain (vesselFM-style backgrounds)."""
    texture = _texture(texture_rng, look, shape)
    if look.regions < 2:
        return texture
    grain = smooth_noise(region_rng, shape, [([look.fine_scale] * 3, look.texture_rms)])
    region = _voronoi(region_rng, shape, look.regions)
    level = region_rng.normal(0.0, look.region_contrast, look.regions).astype(np.float32)
    gain = np.exp(region_rng.normal(0.0, 0.35, look.regions)).astype(np.float32)
    mix = region_rng.uniform(0.0, 1.0, look.regions).astype(np.float32)
    mix_map = mix[region]
    texture *= mix_map
    grain *= 1 - mix_map
    texture += grain
    texture *= gain[region]
    texture += level[region]
    return texture


def _texture(rng: np.random.Generator, look: SimpleNamespace, shape: tuple[int, int, int]) -> np.ndarray:
    """Octaves of smooth noise from the fine to the coarse scale, amplitude ~ scale ** slope,
    ``look.texture_rms`` in all, stretched by ``look.anisotropy`` along one random axis."""
    scales = np.geomspace(look.fine_scale, look.coarse_scale, look.octaves)
    amplitudes = scales**look.slope
    amplitudes *= look.texture_rms / np.sqrt(np.sum(amplitudes**2))
    stretch = np.ones(3)
    stretch[rng.integers(3)] = look.anisotropy
    return smooth_noise(rng, shape, [(list(scale * stretch), amplitude) for scale, amplitude in zip(scales, amplitudes, strict=True)])


def _voronoi(rng: np.random.Generator, shape: tuple[int, int, int], count: int) -> np.ndarray:
    """(Z, Y, X) uint8 region ids 0..count-1: nearest of ``count`` random sites under a random
    axis weighting, with warped borders; computed on a coarse grid and repeated up."""
    coarse = [math.ceil(side / REGION_GRID) for side in shape]
    sites = rng.uniform(0.0, 1.0, (count, 3)) * coarse
    weights = np.exp(rng.uniform(-0.7, 0.7, 3))
    warp = 0.15 * max(coarse)
    axes = [
        np.arange(side, dtype=np.float32).reshape([-1 if axis == i else 1 for i in range(3)])
        for axis, side in enumerate(coarse)
    ]
    warped = [axes[i] + smooth_noise(rng, coarse, [([max(coarse) / 4] * 3, warp)]) for i in range(3)]
    best = np.full(coarse, np.inf, dtype=np.float32)
    region = np.zeros(coarse, dtype=np.uint8)
    for index, site in enumerate(sites):
        distance = sum(weights[i] * (warped[i] - site[i]) ** 2 for i in range(3))
        closer = distance < best
        best[closer], region[closer] = distance[closer], index
    indices = np.ix_(*(np.arange(side) // REGION_GRID for side in shape))
    return region[indices]


# --- vessels and particles ------------------------------------------------------------------------


def _add_vessels(
    rng: np.random.Generator, look: SimpleNamespace, scene: Scene, voxel_size_um: float, image: np.ndarray
) -> None:
    """Add the vessels to the tissue ``image``: each branch's lumen (and wall) contrast, edges
    blurred by partial volume; ``look.lumen_texture`` < 1 flattens the tissue texture inside."""
    lumen, wall = _branch_contrasts(rng, look, scene.trees)
    thickness = max(0.7, look.wall_um / voxel_size_um)
    vessels = lumen[scene.owner]
    if scene.depth is not None:
        in_wall = (scene.depth < thickness) & (scene.owner > 0)
        vessels[in_wall] = wall[scene.owner[in_wall]]
    if look.lumen_texture < 1:
        inside = blur((scene.owner > 0).astype(np.float32), look.edge_blur)
        image *= 1 - (1 - np.float32(look.lumen_texture)) * inside
    image += blur(vessels, look.edge_blur)


def _branch_contrasts(
    rng: np.random.Generator, look: SimpleNamespace, trees: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(lumen, wall) contrast per owner value (0 = no vessel: 0). Magnitudes vary per tree,
    signs follow ``look.polarity``; a walled tree's wall has the lumen's opposite sign, an
    unwalled tree's wall is its lumen."""
    n_trees = int(trees.max()) + 1
    magnitude = look.contrast * rng.uniform(*PER_ITEM_SPREAD, n_trees)
    wall_magnitude = look.wall_contrast * rng.uniform(*PER_ITEM_SPREAD, n_trees)
    walled = rng.uniform(0.0, 1.0, n_trees) < look.walled
    tree_sign = rng.choice([-1.0, 1.0], n_trees)
    branch_sign = rng.choice([-1.0, 1.0], len(trees))
    sign = {"bright": np.ones(len(trees)), "dark": -np.ones(len(trees)),
            "tree": tree_sign[trees], "branch": branch_sign}[look.polarity]
    lumen = sign * magnitude[trees]
    wall = np.where(walled[trees], -sign * wall_magnitude[trees], lumen)
    return (np.concatenate(([0.0], values)).astype(np.float32) for values in (lumen, wall))


def _add_particles(rng: np.random.Generator, look: SimpleNamespace, voxel_size_um: float, image: np.ndarray) -> None:
    """Add glomerulus-like blobs (``look.particle_um`` wide) and small flakes
    (elongated along one random axis), bright or dark; they are not vessels and never labelled."""
    tissue_mm3 = image.size * (voxel_size_um / 1000) ** 3
    sigma = look.particle_um / voxel_size_um * BLOB_SIGMA_PER_DIAMETER
    flake = [0.5, 0.5, 0.5]
    flake[rng.integers(3)] *= rng.uniform(2.0, 4.0)
    populations = [(look.particles, (sigma,) * 3), (look.flakes, tuple(flake))]
    for density, sigmas in populations:
        count = min(rng.poisson(density * tissue_mm3), int(MAX_PARTICLE_SHARE * image.size))
        if count == 0:
            continue
        impulses = np.zeros(image.size, dtype=np.float32)
        bright = rng.uniform(0.0, 1.0, count) < look.bright_particles
        amplitude = look.particle_contrast * rng.uniform(0.5, 1.5, count) * np.where(bright, 1.0, -1.0)
        np.add.at(impulses, rng.integers(0, image.size, count), amplitude.astype(np.float32))
        image += blur(impulses.reshape(image.shape), sigmas) / _peak(sigmas)


def _peak(sigmas: tuple[float, float, float]) -> float:
    """The centre value of a unit impulse after ``blur`` with ``sigmas``: blobs get their
    amplitude as peak height."""
    reach = [2 * math.ceil(4 * s) + 1 for s in sigmas]
    impulse = np.zeros(reach, dtype=np.float32)
    impulse[tuple(r // 2 for r in reach)] = 1.0
    return float(blur(impulse, sigmas).max())


# --- scan artefacts and noise ---------------------------------------------------------------------


def _rings(rng: np.random.Generator, look: SimpleNamespace, shape: tuple[int, int, int]) -> np.ndarray:
    """(Z, Y, X) ring artefacts: ``look.ring_count`` thin rings around one centre (the rotation
    axis), the same in every slice, their strength drifting slowly through the stack."""
    depth, height, width = shape
    centre = np.array([height, width]) * rng.uniform(0.4, 0.6, 2)
    y, x = np.ogrid[:height, :width]
    distance = np.hypot(y - centre[0], x - centre[1]).astype(np.float32)
    plane = np.zeros((height, width), dtype=np.float32)
    for _ in range(look.ring_count):
        radius, half_width = rng.uniform(2, distance.max()), rng.uniform(0.6, 1.5)
        amplitude = look.rings * rng.uniform(*PER_ITEM_SPREAD) * rng.choice([-1, 1])
        plane += np.float32(amplitude) * np.exp(-0.5 * ((distance - radius) / half_width) ** 2)
    phase = np.linspace(0, rng.uniform(1, 4) * np.pi, depth) + rng.uniform(0, 2 * np.pi)
    drift = (1.0 + 0.3 * np.sin(phase)).astype(np.float32)
    return plane[None] * drift[:, None, None]


def _add_streaks(rng: np.random.Generator, look: SimpleNamespace, image: np.ndarray) -> None:
    """Add ``look.streak_count`` straight bright or dark streaks across the slice, each through
    1-4 slices."""
    depth, height, width = image.shape
    for _ in range(look.streak_count):
        plane = np.zeros((height, width), dtype=np.float32)
        angle = rng.uniform(0, np.pi)
        through = np.array([width, height]) * rng.uniform(0.2, 0.8, 2)
        step = 2 * max(height, width) * np.array([np.cos(angle), np.sin(angle)])
        ends = [tuple(int(v) for v in through + sign * step) for sign in (-1, 1)]
        cv2.line(plane, ends[0], ends[1], color=1.0, thickness=int(rng.integers(1, 3)))
        amplitude = look.streaks * rng.uniform(*PER_ITEM_SPREAD) * rng.choice([-1, 1])
        first = rng.integers(depth)
        image[first : first + rng.integers(1, 5)] += np.float32(amplitude) * cv2.GaussianBlur(plane, (0, 0), 1.0)


def _drift(rng: np.random.Generator, spread: float, depth: int) -> np.ndarray:
    """(depth,) float32 slice levels: a zero-mean random walk with standard deviation ``spread``."""
    walk = np.cumsum(rng.standard_normal(depth))
    walk -= walk.mean()
    return (walk * (spread / max(float(walk.std()), 1e-6))).astype(np.float32)


def _add_noise(rng: np.random.Generator, look: SimpleNamespace, image: np.ndarray) -> None:
    """Add noise of ``look.noise`` standard deviation at the tissue level: constant (gaussian),
    growing as the square root of the signal above the darkest value (poisson) or with the
    signal (speckle)."""
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    noise *= np.float32(look.noise)
    if look.noise_kind != "gaussian":
        floor = float(image.min()) - 1.0
        signal = (image - np.float32(floor)) / np.float32(-floor if floor < 0 else 1.0)
        noise *= np.sqrt(signal) if look.noise_kind == "poisson" else signal
    image += noise
