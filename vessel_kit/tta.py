"""Test-time augmentation views of (B, C, H, W) tile or (B, C, D, H, W) patch batches and their
exact inverses.

A view transforms the input; its inverse maps the model's output back onto the original window,
so the logits of all views can be averaged voxel for voxel. "d4" rotates in the (H, W) plane, so
it needs square windows there: rot90 of a non-square one would not fit the same window.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

TTA_MODES = ("none", "flips", "d4")
View = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]

__all__ = ["TTA_MODES", "tta_views"]


def tta_views(mode: str, *, spatial_dims: int = 2, reverse_slices: bool = False) -> list[View]:
    """(transform, inverse) pairs: "none" 1 view; "flips" every combination of flips of the
    spatial dims (2D: none, x, y, xy; 3D: the 8 of z, y, x); "d4" 8 (the 4 rotations in the
    (H, W) plane, each with and without an x flip). ``reverse_slices`` doubles the views with
    the 2.5D channel order reversed; their inverse reverses the output channels back (the planes
    of a multi-slice model come out in reversed order; one channel is left as it is)."""
    if mode not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, got {mode!r}")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if mode == "none":
        views = [_identity()]
    elif mode == "flips":
        dims = tuple(range(-spatial_dims, 0))[::-1]  # x first: (-1,), (-2,), (-2, -1), ...
        combos = [c for n in range(1, spatial_dims + 1) for c in itertools.combinations(dims, n)]
        views = [_identity()] + [_flip(tuple(sorted(c))) for c in combos]
    else:
        views = [_rotate(k, flip) for k in range(4) for flip in (False, True)]
    if reverse_slices:
        views = views + [(_then_reverse_channels(forward), _then_reverse_channels(inverse)) for forward, inverse in views]
    return views


def _identity() -> View:
    return (lambda x: x), (lambda y: y)


def _flip(dims: tuple[int, ...]) -> View:
    return (lambda x: torch.flip(x, dims)), (lambda y: torch.flip(y, dims))


def _rotate(k: int, flip: bool) -> View:
    def forward(x: torch.Tensor) -> torch.Tensor:
        x = torch.rot90(x, k, dims=(-2, -1))
        return torch.flip(x, (-1,)) if flip else x

    def inverse(y: torch.Tensor) -> torch.Tensor:
        y = torch.flip(y, (-1,)) if flip else y
        return torch.rot90(y, -k, dims=(-2, -1))

    return forward, inverse


def _then_reverse_channels(transform: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``transform`` then the channel order reversed (it commutes with the in-plane transforms)."""
    return lambda x: torch.flip(transform(x), (1,))
