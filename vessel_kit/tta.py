"""Test-time augmentation views of (B, C, H, W) tile batches and their exact inverses.

A view transforms the input; its inverse maps the model's output back onto the original tile, so
the logits of all views can be averaged pixel for pixel. Views of square tiles only: rot90 of a
non-square tile would not fit the same window.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

TTA_MODES = ("none", "flips", "d4")
View = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]

__all__ = ["TTA_MODES", "tta_views"]


def tta_views(mode: str, *, reverse_slices: bool = False) -> list[View]:
    """(transform, inverse) pairs: "none" 1 view, "flips" 4 (none, x, y, xy), "d4" 8 (the 4
    rotations, each with and without an x flip). ``reverse_slices`` doubles the views with the
    2.5D channel order reversed (the output has one channel, so nothing to undo there)."""
    if mode not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, got {mode!r}")
    if mode == "none":
        views = [_identity()]
    elif mode == "flips":
        views = [_identity(), _flip((-1,)), _flip((-2,)), _flip((-2, -1))]
    else:
        views = [_rotate(k, flip) for k in range(4) for flip in (False, True)]
    if reverse_slices:
        views = views + [(_then_reverse_channels(forward), inverse) for forward, inverse in views]
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


def _then_reverse_channels(forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: torch.flip(forward(x), (1,))
