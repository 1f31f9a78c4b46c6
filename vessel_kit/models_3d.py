"""3D networks from MONAI, registered by ``models.py`` as the architectures ``dynunet`` and
``resunet``.

MONAI is an optional dependency (``pip install vessel_kit[3d]``), imported only when a 3D model
is asked for, so the 2D path never needs it. Each network maps (B, 1, D, H, W) patches to
(B, 1, D, H, W) logits; its options are MONAI's keyword arguments given as ``model_kwargs``, with
defaults filled in here:

- ``dynunet`` (``monai.networks.nets.DynUNet``, nnU-Net style): ``strides`` [1, 2, 2, 2, 2],
  ``kernel_size`` 3 per level, ``upsample_kernel_size`` = ``strides[1:]``, ``filters`` MONAI's.
- ``resunet`` (``monai.networks.nets.UNet`` with residual units): ``channels``
  [16, 32, 64, 128, 256], ``strides`` 2 per level, ``num_res_units`` 2.

Example::

    config = ModelConfig(arch="dynunet", spatial_dims=3, tile_size=(32, 64, 64),
                         model_kwargs={"filters": [8, 16, 32, 64], "strides": [1, 2, 2, 2]})
    model = build_model_from_config(config)  # stride 8: every patch side a multiple of 8
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from .models import ModelConfig

MONAI_HINT = "3D models need MONAI: pip install vessel_kit[3d]"
# Keyword arguments vessel_kit sets itself: 3D, the input channels, one logit channel, one output.
RESERVED_KWARGS = frozenset({"spatial_dims", "in_channels", "out_channels", "deep_supervision", "deep_supr_num"})

__all__ = ["MONAI_HINT", "MONAI_NETWORKS", "build_monai", "check_monai", "monai_stride"]


@dataclass(frozen=True)
class MonaiNetwork:
    """A MONAI class (by name in ``monai.networks.nets``) and how its defaults fill ``model_kwargs``."""

    class_name: str
    with_defaults: Callable[[dict[str, Any]], dict[str, Any]]


def _dynunet_defaults(kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(kwargs)
    strides = kwargs.setdefault("strides", [1, 2, 2, 2, 2])
    kwargs.setdefault("kernel_size", [3] * len(strides))
    kwargs.setdefault("upsample_kernel_size", list(strides[1:]))
    return kwargs


def _resunet_defaults(kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(kwargs)
    channels = kwargs.setdefault("channels", [16, 32, 64, 128, 256])
    kwargs.setdefault("strides", [2] * (len(channels) - 1))
    kwargs.setdefault("num_res_units", 2)
    return kwargs


# Architecture name -> MONAI network; ``models.py`` registers each.
MONAI_NETWORKS: dict[str, MonaiNetwork] = {
    "dynunet": MonaiNetwork("DynUNet", _dynunet_defaults),
    "resunet": MonaiNetwork("UNet", _resunet_defaults),
}


def check_monai(config: ModelConfig) -> None:
    """What a MONAI architecture accepts: spatial_dims 3, one input channel, MONAI keyword
    arguments other than those vessel_kit sets; ImportError when MONAI is missing."""
    arch = config.arch.lower()
    if config.spatial_dims != 3:
        raise ValueError(f"architecture {config.arch!r} (MONAI) is 3D: set spatial_dims=3 (got {config.spatial_dims}), "
                         "or pick a 2D architecture such as 'unet'")
    if config.in_chans != 1:
        raise ValueError(f"architecture {config.arch!r} reads 3D patches of one channel: set in_chans=1 "
                         f"(got {config.in_chans})")
    reserved = sorted(RESERVED_KWARGS & set(config.model_kwargs))
    if reserved:
        raise ValueError(f"model kwargs {reserved} are set by vessel_kit and cannot be given")
    network = _network_class(arch)
    valid = set(inspect.signature(network.__init__).parameters) - {"self"} - RESERVED_KWARGS
    unknown = sorted(set(config.model_kwargs) - valid)
    if unknown:
        raise ValueError(f"model kwargs {unknown} are not options of MONAI's {network.__name__}; valid: {sorted(valid)}")


def build_monai(config: ModelConfig) -> nn.Module:
    """The MONAI network of ``config.arch`` with one logit channel; bad ``model_kwargs`` values
    raise ValueError (not a traceback from inside MONAI)."""
    arch = config.arch.lower()
    network = _network_class(arch)
    kwargs = MONAI_NETWORKS[arch].with_defaults(config.model_kwargs)
    try:
        return network(spatial_dims=3, in_channels=config.in_chans, out_channels=1, **kwargs)
    except (ValueError, TypeError, AssertionError, IndexError, KeyError) as err:
        raise ValueError(f"model_kwargs {config.model_kwargs} do not build MONAI's {network.__name__} "
                         f"(with defaults filled in: {kwargs}): {err}") from None


def monai_stride(model: nn.Module) -> int | None:
    """The multiple every side of a MONAI U-Net's input must be: per dimension the product of
    its ``strides`` (the lcm over dimensions for anisotropic ones); None for other models."""
    strides = getattr(model, "strides", None)
    if not type(model).__module__.startswith("monai.networks") or strides is None:
        return None
    per_dim = [1, 1, 1]
    for stride in strides:
        sides = [int(stride)] * 3 if isinstance(stride, int) else [int(s) for s in stride]
        per_dim = [have * side for have, side in zip(per_dim, sides, strict=True)]
    return math.lcm(*per_dim)


def _network_class(arch: str) -> type[nn.Module]:
    try:
        from monai.networks import nets
    except ImportError:
        raise ImportError(MONAI_HINT) from None
    return getattr(nets, MONAI_NETWORKS[arch].class_name)
