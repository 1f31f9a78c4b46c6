"""Decoder variants of the smp networks: the norm and activation of each decoder conv block.

smp 0.6 builds its U-Net / U-Net++ decoder blocks as conv -> BatchNorm -> ReLU (its
``decoder_use_norm`` offers batch, instance, "layernorm" and identity, but no GroupNorm, and the
activation is always ReLU); the FPN's blocks are conv -> GroupNorm(32) -> ReLU. The 1st place ran
GroupNorm and GELU in its U-Net decoder: small per-GPU batches of whole upscaled slices make
BatchNorm statistics noisy, which GroupNorm does not depend on. Two ``model_kwargs`` of the smp
architectures choose them, recorded in the checkpoint's ``ModelConfig`` like any model option so
a checkpoint rebuilds the same network:

    decoder_norm        batch     nn.BatchNorm2d(C)
                        group     nn.GroupNorm(gcd(32, C), C): 32 groups where C allows
                        instance  nn.InstanceNorm2d(C, affine=True)
                        layer     timm's LayerNorm2d(C): over the channels of each pixel (ConvNeXt's)
    decoder_activation  relu | gelu | silu

``apply_decoder_variant`` swaps them into a built model's ``decoder`` after smp built it: in every
conv -> norm -> activation block, the norm layer and the activation right after it. The encoder,
the attention blocks (their ReLUs follow a conv, not a norm) and the segmentation head keep theirs.
Absent options keep smp's own layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from timm.layers import LayerNorm2d
from torch import nn

__all__ = ["DECODER_ACTIVATIONS", "DECODER_NORMS", "DECODER_OPTIONS", "apply_decoder_variant", "check_decoder_options"]

DECODER_NORMS: dict[str, Callable[[int], nn.Module]] = {
    "batch": nn.BatchNorm2d,
    "group": lambda channels: nn.GroupNorm(math.gcd(32, channels), channels),
    "instance": lambda channels: nn.InstanceNorm2d(channels, affine=True),
    "layer": LayerNorm2d,
}
DECODER_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
DECODER_OPTIONS = ("decoder_norm", "decoder_activation")

# The norm layers smp's decoder blocks use (the ones a decoder_norm replaces).
_NORM_TYPES = (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d, nn.LayerNorm)


def check_decoder_options(model_kwargs: Mapping[str, Any]) -> None:
    """Raise ValueError naming the option and its valid values for a bad ``decoder_norm`` or
    ``decoder_activation``, or for ``decoder_norm`` beside smp's own ``decoder_use_norm``."""
    for name, choices in (("decoder_norm", DECODER_NORMS), ("decoder_activation", DECODER_ACTIVATIONS)):
        value = model_kwargs.get(name)
        if value is not None and value not in choices:
            raise ValueError(f"model_kwargs {name}={value!r} is unknown; valid: {sorted(choices)}")
    if model_kwargs.get("decoder_norm") is not None and "decoder_use_norm" in model_kwargs:
        raise ValueError("model_kwargs decoder_norm and smp's decoder_use_norm both set the decoder's norm; give one")


def apply_decoder_variant(model: nn.Module, norm: str | None = None, activation: str | None = None) -> nn.Module:
    """``model`` (an smp network) with its decoder blocks' norm and/or activation replaced, in
    place; None keeps smp's. Returns the model. Raises ValueError if the decoder has no
    conv -> norm -> activation block to change."""
    check_decoder_options({"decoder_norm": norm, "decoder_activation": activation})
    if norm is None and activation is None:
        return model
    decoder = getattr(model, "decoder", None)
    if not isinstance(decoder, nn.Module):
        raise ValueError(f"{type(model).__name__} has no decoder module; decoder_norm/decoder_activation are for smp networks")
    changed = 0
    for block in decoder.modules():
        if not isinstance(block, nn.Sequential):
            continue
        layers = list(block)
        for index, layer in enumerate(layers[:-1]):
            if not isinstance(layer, _NORM_TYPES) or not isinstance(layers[index + 1], nn.ReLU):
                continue
            if norm is not None:
                block[index] = DECODER_NORMS[norm](_channels(layer))
            if activation is not None:
                block[index + 1] = DECODER_ACTIVATIONS[activation]()
            changed += 1
    if not changed:
        raise ValueError(f"{type(decoder).__name__} has no conv -> norm -> ReLU block for decoder_norm/decoder_activation to change")
    return model


def _channels(norm: nn.Module) -> int:
    """The channel count of a norm layer of any of ``_NORM_TYPES``."""
    if isinstance(norm, nn.GroupNorm):
        return norm.num_channels
    if isinstance(norm, nn.LayerNorm):
        return norm.normalized_shape[0]
    return norm.num_features
