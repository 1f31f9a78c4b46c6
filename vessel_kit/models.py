"""Segmentation models: the architecture registry, building, input-size rule and checkpoints.

A model is any ``torch.nn.Module`` mapping (B, C, H, W) float input to (B, 1, H, W) logits (2D),
or (B, 1, D, H, W) patches to (B, 1, D, H, W) logits (3D). A 2.5D model with ``out_chans`` m > 1
(multi-slice output, the 1st place's "3 slices in, 3 out") maps its ``in_chans`` planes to
(B, m, H, W) logits: the m planes centred on the middle input plane; the built model carries
``out_chans`` as an attribute (``module_out_chans``), so inference knows it from the module too.
It is built from a ``ModelConfig`` by
the builder registered under its ``arch`` (``register_architecture``); the built-in 2D ones are
segmentation_models_pytorch (smp) networks with ``out_chans`` output classes and no activation, which check
their own options (smp encoder names, 2D only); the built-in 3D ones, ``dynunet`` and
``resunet``, are MONAI networks (``models_3d.py``, the ``vessel_kit[3d]`` extra). Everything works
offline: pretrained encoder weights are never downloaded, only read from a local file.

Input size: every side given to a model must be a multiple of ``model_stride(model)``; callers pad
(the inference engine pads tiles up to it). For most encoders that is 32 (five 2x downsamplings;
FPN and Unet++ raise at forward otherwise, while Unet runs but interpolates its skips, which
misaligns features, so pad it too). MaxViT encoders also partition every stage into fixed
windows/grids of ``img_size // 32`` tokens (``img_size`` is the timm model's, e.g. 512 for
``maxvit_base_tf_512``), so a side must be a multiple of ``img_size``: 512 for
``tu-maxvit_base_tf_512``, 224 for ``*_224`` and 256 for ``*_256`` variants. Passing
``img_size=S`` (a multiple of 32) to ``build_model`` changes that multiple to S, but resizes the
relative-position tables, so weights pretrained at another size no longer load (ValueError).
For the MONAI 3D networks the multiple is the product of their ``strides`` (16 for the defaults).

Checkpoints are single ``.safetensors`` files: the model's tensors plus JSON metadata (the
``ModelConfig`` needed to rebuild the model, metrics, extra data and versions). Loading one runs no
pickled code. (Weight EMA and the training state for resuming live in ``ema.py`` and
``training_state.py``.)
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import json
import math
import os
import shutil
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_model
from timm.models import adapt_input_conv
from torch import nn

from .atomic import atomic_output
from .decoder_layers import DECODER_OPTIONS, apply_decoder_variant, check_decoder_options
from .folders import existing_file
from .models_3d import MONAI_NETWORKS, build_monai, check_monai, monai_stride
from .normalize import Normalization
from .values import is_int

# The smp classes registered as architectures (below, after their builder).
SMP_ARCHITECTURES: dict[str, type[nn.Module]] = {
    name: smp.MODEL_ARCHITECTURES_MAPPING[name] for name in ("unet", "unetplusplus", "fpn")
}
SPATIAL_DIMS = (2, 3)
DEFAULT_ARCH = "unet"
DEFAULT_ENCODER = "tu-maxvit_base_tf_512"
DEFAULT_STRIDE = 32
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
CHECKPOINT_FORMAT_VERSION = 1
COMPILE_BACKEND = "inductor"  # torch.compile's backend in compile_model (tests use "aot_eager": no C++ build)

_METADATA_KEY = "vessel_kit"
_RESERVED_KWARGS = frozenset({"encoder_name", "encoder_weights", "in_channels", "classes", "activation"})
_KEY_PREFIXES = ("module.", "_orig_mod.", "model.", "encoder.")
_STATE_DICT_WRAPPERS = ("state_dict", "model_state_dict", "model")
_SHOWN_KEYS = 5

__all__ = [
    "ARCHITECTURES",
    "CHECKPOINT_FORMAT_VERSION",
    "DEFAULT_STRIDE",
    "SMP_ARCHITECTURES",
    "Architecture",
    "ModelConfig",
    "build_model",
    "build_model_from_config",
    "compile_model",
    "memory_format",
    "list_encoders",
    "load_checkpoint",
    "model_stride",
    "module_out_chans",
    "read_checkpoint_metadata",
    "register_architecture",
    "save_checkpoint",
    "unwrap_model",
]


# ---------------------------------------------------------------------------------------------
# The architecture registry


@dataclass(frozen=True)
class Architecture:
    """A registered architecture: ``build(config)`` returns the module for a ``ModelConfig``;
    ``check(config)``, if given, raises ValueError for options this architecture cannot take, so a
    bad config fails when it is made, before any weights exist. ``multi_slice``: the builder honours
    ``config.out_chans`` (m output planes); architectures without it refuse ``out_chans`` != 1.

    Example::

        register_architecture("tiny", lambda config: nn.Conv2d(config.in_chans, 1, 3, padding=1))
        model = build_model_from_config(ModelConfig(arch="tiny", in_chans=3, tile_size=64))
    """

    build: Callable[[ModelConfig], nn.Module]
    check: Callable[[ModelConfig], None] | None = None
    multi_slice: bool = False


# Lower-case name -> architecture; add entries with ``register_architecture``.
ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(
    name: str,
    build: Callable[[ModelConfig], nn.Module],
    *,
    check: Callable[[ModelConfig], None] | None = None,
    replace: bool = False,
    multi_slice: bool = False,
) -> None:
    """Make ``name`` (any case) a valid ``ModelConfig.arch``, built by ``build(config)``.

    ``build`` gets the whole ``ModelConfig`` (``in_chans``, ``spatial_dims``, ``encoder``,
    ``model_kwargs``, ...) and returns a module mapping (B, in_chans, *spatial) input to
    (B, 1, *spatial) logits (``multi_slice=True``: (B, config.out_chans, H, W), the output planes
    centred on the middle input plane); a module with an ``encoder`` attribute can take
    ``encoder_weights``. ``check`` validates a config early (see ``Architecture``). A checkpoint of a registered
    architecture loads in any process that registered it too. Re-registering a name needs
    ``replace=True``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"architecture name must be a non-empty string, got {name!r}")
    if not callable(build) or (check is not None and not callable(check)):
        raise ValueError(f"architecture {name!r}: build and check must be callables")
    if name.lower() in ARCHITECTURES and not replace:
        raise ValueError(f"architecture {name!r} is registered already; pass replace=True to replace it")
    ARCHITECTURES[name.lower()] = Architecture(build, check, multi_slice)


# ---------------------------------------------------------------------------------------------
# Building


def build_model(
    arch: str = DEFAULT_ARCH,
    encoder: str = DEFAULT_ENCODER,
    in_chans: int = 1,
    encoder_weights: str | os.PathLike | None = None,
    spatial_dims: int = 2,
    out_chans: int = 1,
    **kwargs: Any,
) -> nn.Module:
    """A model of a registered architecture with ``out_chans`` output channels of logits (1, or
    the odd number of planes a multi-slice 2.5D model predicts): 2D, or 3D with
    ``spatial_dims=3`` (``build_model("dynunet", in_chans=1, spatial_dims=3)``).

    ``arch`` is a key of ``ARCHITECTURES`` (any case). For the smp ones, ``encoder`` is an smp
    encoder name or a timm model prefixed ``tu-`` (see ``list_encoders``). ``in_chans`` (odd) sets
    the stem's input channels. ``encoder_weights`` is None (random init) or a local weights file
    (.pth/.pt/.bin/.ckpt/.safetensors) holding an encoder (smp or timm) or a full model state dict:
    only its encoder tensors are used, and a 3-channel stem is adapted to ``in_chans`` as timm does.
    ``kwargs`` (JSON values) are the config's ``model_kwargs``: for smp, e.g. ``decoder_channels``,
    ``encoder_depth``, or ``img_size`` for timm encoders, and vessel_kit's ``decoder_norm``
    (batch, group, instance, layer) and ``decoder_activation`` (relu, gelu, silu), which swap the
    decoder blocks' layers (``decoder_layers.py``; the 1st place's decoder: group + gelu).
    """
    config = ModelConfig(arch=arch, encoder=encoder, in_chans=in_chans, model_kwargs=kwargs, spatial_dims=spatial_dims,
                         out_chans=out_chans)
    return _build(config, encoder_weights)


def list_encoders() -> list[str]:
    """Every valid encoder name: smp's own encoders and every timm model prefixed ``tu-``."""
    return sorted(smp.encoders.get_encoder_names()) + [f"tu-{name}" for name in timm.list_models()]


def module_out_chans(model: nn.Module) -> int:
    """The output planes a module predicts: its ``out_chans`` attribute (models built here carry
    it; a hand-made multi-slice module declares it), else 1."""
    return int(getattr(unwrap_model(model), "out_chans", 1))


def model_stride(model: nn.Module) -> int:
    """The multiple every input side must be (pad up to it): the encoder's output stride, raised
    to cover MaxViT-style window/grid partitions (side % (stage reduction * partition) == 0).

    MONAI 3D networks get the product of their strides (``models_3d.monai_stride``); other models
    without an smp ``encoder`` get ``DEFAULT_STRIDE``.
    """
    stride_3d = monai_stride(unwrap_model(model))
    if stride_3d is not None:
        return stride_3d
    encoder = getattr(unwrap_model(model), "encoder", None)
    stride = int(getattr(encoder, "output_stride", DEFAULT_STRIDE))
    timm_model = getattr(encoder, "model", None)
    if not isinstance(timm_model, nn.Module):
        return stride
    reductions = _stage_reductions(timm_model)
    for name, module in timm_model.named_modules():
        partition = getattr(module, "partition_size", None)
        if partition is not None:
            # The deepest stage's reduction is a safe bound for blocks outside any known stage.
            reduction = reductions.get(name.split(".")[0], max(reductions.values(), default=DEFAULT_STRIDE))
            stride = math.lcm(stride, *(reduction * int(p) for p in partition))
    return stride


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a trained model and feed it what it was trained on.

    ``arch`` names a registered architecture (``register_architecture``), which checks the rest
    (the smp ones check ``encoder`` and ``model_kwargs``). ``in_chans`` is odd: the centre plane and
    its neighbours on both sides (1 for 3D). ``out_chans`` (odd, <= ``in_chans``) is how many planes
    the model predicts, centred on the middle input plane: 1 (the middle one), or e.g. 3 for the
    1st place's "3 in, 3 out" (2D architectures registered ``multi_slice`` only; inference blends
    each output plane back at its own plane). ``spatial_dims`` is 2 (planes, the smp models) or 3
    (patches, the MONAI models; ``encoder`` is unused by them).
    ``voxel_size_um`` is the training data's voxel size (None if unknown or mixed), so inference
    can rescale other scans; ``tile_size`` is the training tile side, or one side per spatial
    dimension (e.g. a (D, H, W) patch); ``model_kwargs`` are extra builder keyword arguments
    (JSON-serialisable; stored in canonical JSON form).

    Example::

        config = ModelConfig(arch="unet", encoder="resnet18", in_chans=3, tile_size=256)
        three_out = ModelConfig(arch="unet", encoder="resnet18", in_chans=3, out_chans=3, tile_size=256)
        patches = ModelConfig(arch="dynunet", spatial_dims=3, tile_size=(32, 128, 128))
        model = build_model_from_config(config)
    """

    arch: str = DEFAULT_ARCH
    encoder: str = DEFAULT_ENCODER
    in_chans: int = 1
    normalization: Normalization = field(default_factory=Normalization)
    voxel_size_um: float | None = None
    tile_size: int | tuple[int, ...] = 512
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    spatial_dims: int = 2
    out_chans: int = 1

    def __post_init__(self) -> None:
        architecture = _architecture(self.arch)
        _check_in_chans(self.in_chans)
        if isinstance(self.spatial_dims, bool) or self.spatial_dims not in SPATIAL_DIMS:
            raise ValueError(f"spatial_dims must be one of {SPATIAL_DIMS}, got {self.spatial_dims!r}")
        _check_out_chans(self.out_chans, self.in_chans, self.spatial_dims, self.arch, architecture.multi_slice)
        if not isinstance(self.normalization, Normalization):
            raise ValueError(f"normalization must be a Normalization, got {type(self.normalization).__name__}")
        if self.voxel_size_um is not None:
            if not float(self.voxel_size_um) > 0:
                raise ValueError(f"voxel_size_um must be positive or None, got {self.voxel_size_um}")
            object.__setattr__(self, "voxel_size_um", float(self.voxel_size_um))
        object.__setattr__(self, "tile_size", _tile_size(self.tile_size, self.spatial_dims))
        if not isinstance(self.model_kwargs, Mapping):
            raise ValueError(f"model_kwargs must be a mapping, got {self.model_kwargs!r}")
        object.__setattr__(self, "model_kwargs", _json_round_trip(dict(self.model_kwargs), "model_kwargs"))
        if architecture.check is not None:
            architecture.check(self)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; ``from_dict`` inverts it."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["normalization"] = self.normalization.to_dict()
        values["model_kwargs"] = dict(self.model_kwargs)
        values["tile_size"] = self.tile_size if isinstance(self.tile_size, int) else list(self.tile_size)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        """The config ``to_dict`` gave (older checkpoints, without ``spatial_dims``, are 2D;
        without ``out_chans``, 1-out)."""
        valid = {f.name for f in fields(cls)}
        unknown = set(values) - valid
        if unknown:
            raise ValueError(f"unknown model config fields {sorted(unknown)}; valid: {sorted(valid)}")
        values = dict(values)
        if "normalization" in values:
            values["normalization"] = Normalization.from_dict(values["normalization"])
        return cls(**values)


def build_model_from_config(config: ModelConfig, *, encoder_weights: str | os.PathLike | None = None) -> nn.Module:
    """The model ``config`` describes, built by its architecture's builder, with encoder weights
    from a local file when given (see ``build_model``); checks that ``tile_size`` fits the model's
    stride."""
    model = _build(config, encoder_weights)
    stride = model_stride(model)
    sides = [config.tile_size] if isinstance(config.tile_size, int) else config.tile_size
    if any(side % stride for side in sides):
        name = config.arch if config.arch.lower() in MONAI_NETWORKS else f"{config.arch}/{config.encoder}"
        raise ValueError(
            f"tile_size {config.tile_size} is not a multiple of {stride}, the input multiple of {name}: "
            f"make every side a multiple of {stride}"
        )
    return model


def _contiguous(module: nn.Module) -> nn.Module:
    """``module``, or a copy in the default memory format when it runs channels last (safetensors
    views each tensor flat to find tied ones, which a channels-last tensor refuses)."""
    if all(tensor.is_contiguous() for tensor in module.state_dict().values()):
        return module
    return copy.deepcopy(module).to(memory_format=torch.contiguous_format)


def memory_format(ndim: int) -> torch.memory_format:
    """The memory format models run in, for (B, C, H, W) or (B, C, D, H, W) batches: channels
    last; convolutions are faster that way on the CPU (benchmarks/bench_memory_format.py, 2 cores:
    inference 1.46x for a ResNet-18 U-Net, a training step of the demo's MobileNetV2 U-Net
    1.24x) and on tensor-core GPUs."""
    return torch.channels_last_3d if ndim == 5 else torch.channels_last


def compile_model(model: nn.Module, device: torch.device | str) -> nn.Module:
    """``torch.compile(model)`` with the ``COMPILE_BACKEND`` backend, for running on ``device``.

    The compiled wrapper shares the model's parameters; keep the plain module for state dicts,
    EMA and checkpoints (``unwrap_model`` finds it again), so no ``_orig_mod.`` key is written.
    Compiling is lazy (at the first call, again for each new input shape): this checks up front
    what it will need, and raises ImportError saying what is missing: ``torch.compile``
    (torch >= 2.0), a C++ compiler for the inductor backend on the CPU, triton on CUDA.
    """
    if not hasattr(torch, "compile"):
        raise ImportError(f"compile needs torch.compile (torch >= 2.0); this is torch {torch.__version__}: "
                          "upgrade torch or set compile: false")
    device = torch.device(device)
    if COMPILE_BACKEND == "inductor":
        if device.type == "cpu" and not any(shutil.which(name) for name in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")):
            raise ImportError("compile on the CPU needs a C++ compiler for torch's inductor backend (g++, c++ or "
                              "clang++ on PATH, or $CXX): install one (e.g. apt-get install g++) or set compile: false")
        if device.type == "cuda" and importlib.util.find_spec("triton") is None:
            raise ImportError("compile on CUDA needs triton for torch's inductor backend: pip install triton "
                              "(the version matching torch) or set compile: false")
    return torch.compile(model, backend=COMPILE_BACKEND)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DataParallel/DistributedDataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _build(config: ModelConfig, encoder_weights: str | os.PathLike | None) -> nn.Module:
    """The registered builder's model for ``config``, with its encoder loaded from ``encoder_weights``."""
    weights_path = _weights_path(encoder_weights)
    model = ARCHITECTURES[config.arch.lower()].build(config)
    if not isinstance(model, nn.Module):
        raise TypeError(f"the builder of architecture {config.arch!r} returned a {type(model).__name__}, not a module")
    declared = getattr(model, "out_chans", None)
    if declared is None:
        model.out_chans = config.out_chans  # read back by module_out_chans (inference of modules)
    elif declared != config.out_chans:
        raise ValueError(f"the builder of architecture {config.arch!r} made a module with out_chans={declared!r}, but "
                         f"the config says out_chans={config.out_chans}: build config.out_chans output planes")
    if weights_path is not None:
        encoder = getattr(model, "encoder", None)
        if not isinstance(encoder, nn.Module):
            raise ValueError(f"architecture {config.arch!r} has no encoder module to load encoder_weights into")
        _load_encoder_weights(encoder, weights_path)
    return model


def _build_smp(config: ModelConfig) -> nn.Module:
    """An smp model: ``SMP_ARCHITECTURES[arch]`` with ``out_chans`` logit channels and no activation, its
    decoder's norm and activation swapped as ``decoder_norm``/``decoder_activation`` say
    (``decoder_layers.py``)."""
    kwargs = dict(config.model_kwargs)
    variant = {name: kwargs.pop(name, None) for name in DECODER_OPTIONS}
    model = SMP_ARCHITECTURES[config.arch.lower()](
        encoder_name=config.encoder, encoder_weights=None, in_channels=config.in_chans, classes=config.out_chans,
        activation=None, **kwargs,
    )
    return apply_decoder_variant(model, norm=variant["decoder_norm"], activation=variant["decoder_activation"])


def _check_smp(config: ModelConfig) -> None:
    """What an smp architecture accepts: 2D, a known encoder, no keyword that vessel_kit sets."""
    if config.spatial_dims != 2:
        raise ValueError(f"architecture {config.arch!r} (segmentation_models_pytorch) is 2D; got spatial_dims "
                         f"{config.spatial_dims}: set spatial_dims=2, or pick a 3D architecture ({sorted(MONAI_NETWORKS)})")
    _check_encoder(config.encoder)
    reserved = sorted(_RESERVED_KWARGS & set(config.model_kwargs))
    if reserved:
        raise ValueError(f"model kwargs {reserved} are set by vessel_kit and cannot be given")
    check_decoder_options(config.model_kwargs)


for _name in SMP_ARCHITECTURES:
    register_architecture(_name, _build_smp, check=_check_smp, multi_slice=True)
for _name in MONAI_NETWORKS:
    register_architecture(_name, build_monai, check=check_monai)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    config: ModelConfig,
    *,
    metrics: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    threshold: float | None = None,
    min_component_size: int | None = None,
) -> Path:
    """Write ``model``'s weights and ``config`` (plus JSON-serialisable ``metrics``/``extra``) to
    one ``.safetensors`` file, atomically. Tied tensors are stored once.

    ``threshold`` is the probability cut calibrated on validation (``calibrate_threshold``), and
    ``min_component_size`` the smallest 3D component kept, counted at the model's resolution
    (``calibrate_min_component_size``): inference uses them unless told others.
    """
    path = Path(path)
    if threshold is not None and not 0.0 < float(threshold) < 1.0:
        raise ValueError(f"threshold must be a probability in (0, 1), got {threshold!r}")
    _check_min_component_size(min_component_size)
    header = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "versions": _versions(),
        "config": config.to_dict(),
        "threshold": None if threshold is None else float(threshold),
        "min_component_size": None if min_component_size is None else int(min_component_size),
        "metrics": _json_round_trip(dict(metrics or {}), "metrics"),
        "extra": _json_round_trip(dict(extra or {}), "extra"),
    }
    with atomic_output(path) as tmp:
        save_model(_contiguous(unwrap_model(model)), str(tmp), metadata={_METADATA_KEY: json.dumps(header)})
    return path


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's metadata without loading its tensors: ``config`` (a ``ModelConfig``),
    ``threshold`` (the calibrated probability cut; None in checkpoints written before
    calibration), ``min_component_size`` (the calibrated smallest component at the model's
    resolution; None in checkpoints written before it was calibrated), ``metrics``, ``extra``, ``versions`` (of the writing packages) and
    ``format_version``."""
    path = existing_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from None
    if _METADATA_KEY not in metadata:
        raise ValueError(f"{path} is a safetensors file but not a vessel_kit checkpoint (no {_METADATA_KEY!r} entry)")
    try:
        header = json.loads(metadata[_METADATA_KEY])
        version = int(header["format_version"])
        if version > CHECKPOINT_FORMAT_VERSION:
            raise ValueError(
                f"format version {version} is newer than this vessel_kit reads ({CHECKPOINT_FORMAT_VERSION}); "
                f"it was written by vessel_kit {header['versions'].get('vessel_kit')}"
            )
        header["config"] = ModelConfig.from_dict(header["config"])
        header.setdefault("threshold", None)
        if header["threshold"] is not None and not 0.0 < float(header["threshold"]) < 1.0:
            raise ValueError(f"threshold {header['threshold']!r} is not a probability in (0, 1)")
        header.setdefault("min_component_size", None)
        _check_min_component_size(header["min_component_size"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: bad vessel_kit checkpoint metadata: {err}") from None
    return header


def _check_min_component_size(size: object) -> None:
    """ValueError unless ``size`` is None or an int >= 0."""
    if size is not None and (not is_int(size) or size < 0):
        raise ValueError(f"min_component_size must be an int >= 0 (or None), got {size!r}")


def load_checkpoint(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelConfig]:
    """Rebuild the model a checkpoint describes, load its weights strictly, and return it in eval
    mode on ``device`` together with its ``ModelConfig``."""
    config = read_checkpoint_metadata(path)["config"]
    try:
        tensors = load_file(str(path))
    except SafetensorError as err:
        raise ValueError(f"{path}: cannot read the checkpoint's tensors: {err}") from None
    model = build_model_from_config(config)
    _load_strict(model, tensors, path)
    return model.to(device).eval(), config


# ---------------------------------------------------------------------------------------------
# Private helpers


def _architecture(arch: str) -> Architecture:
    try:
        return ARCHITECTURES[arch.lower()]
    except (KeyError, AttributeError):
        raise ValueError(
            f"unknown architecture {arch!r}; valid: {sorted(ARCHITECTURES)} (add one with register_architecture)"
        ) from None


def _check_encoder(encoder: str) -> None:
    """Accept smp encoder names and ``tu-<timm model>`` (a pretrained tag such as ``.a1_in1k`` may
    follow, as timm allows); reject anything else with close matches."""
    if not isinstance(encoder, str):
        raise ValueError(f"encoder must be a string, got {encoder!r}")
    if encoder in smp.encoders.get_encoder_names():
        return
    if encoder.startswith("tu-") and timm.is_model(encoder[3:]):
        return
    close = difflib.get_close_matches(encoder, list_encoders(), n=5)
    hint = f"; close matches: {close}" if close else ""
    raise ValueError(
        f"unknown encoder {encoder!r}{hint}. Valid: smp encoder names and timm models prefixed 'tu-'; "
        "list them all with vessel_kit.models.list_encoders()"
    )


def _tile_size(tile_size: Any, spatial_dims: int) -> int | tuple[int, ...]:
    """A positive int, or a tuple of one positive int per spatial dimension (lists accepted, as
    JSON gives them back)."""
    sides = list(tile_size) if isinstance(tile_size, (list, tuple)) else [tile_size]
    if isinstance(tile_size, (list, tuple)) and len(sides) != spatial_dims:
        raise ValueError(f"tile_size {tile_size!r} needs one side per spatial dimension ({spatial_dims})")
    if not all(is_int(side) and side >= 1 for side in sides):
        raise ValueError(f"tile_size must be a positive int or {spatial_dims} of them, got {tile_size!r}")
    return tuple(sides) if isinstance(tile_size, (list, tuple)) else tile_size


def _check_in_chans(in_chans: int) -> None:
    """Odd: a centre plane and as many neighbours on each side (what crops and inference feed)."""
    if not is_int(in_chans) or in_chans < 1 or in_chans % 2 == 0:
        raise ValueError(f"in_chans must be odd (1, 3, 5, ...), got {in_chans!r}")


def _check_out_chans(out_chans: int, in_chans: int, spatial_dims: int, arch: str, multi_slice: bool) -> None:
    """Odd and at most ``in_chans`` (the output planes are input planes: the centre one and as
    many neighbours on each side); > 1 only for 2D architectures registered ``multi_slice``."""
    if not is_int(out_chans) or out_chans < 1 or out_chans % 2 == 0:
        raise ValueError(f"out_chans must be odd (1, 3, 5, ...): the planes predicted around the middle input plane; "
                         f"got {out_chans!r}")
    if out_chans == 1:
        return
    if spatial_dims != 2:
        raise ValueError(f"out_chans={out_chans} is for 2.5D models (planes out); a 3D model (spatial_dims=3) predicts "
                         "its patch: set out_chans=1")
    if out_chans > in_chans:
        raise ValueError(f"out_chans={out_chans} exceeds in_chans={in_chans}: a model predicts planes it sees; "
                         f"set out_chans <= in_chans (e.g. in_chans={out_chans})")
    if not multi_slice:
        raise ValueError(f"architecture {arch!r} predicts one plane: out_chans={out_chans} needs one registered with "
                         f"multi_slice=True ({sorted(name for name, a in ARCHITECTURES.items() if a.multi_slice)}); "
                         "or set out_chans=1")


def _json_round_trip(values: dict[str, Any], what: str) -> dict[str, Any]:
    """``values`` as JSON gives them back (tuples become lists; numpy/torch scalars and arrays
    become numbers and lists), so a stored config compares equal to the loaded one."""
    try:
        return json.loads(json.dumps(values, default=_to_json))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be JSON-serialisable: {err}") from None


def _to_json(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} {value!r} is not JSON-serialisable")


def _versions() -> dict[str, str]:
    # Imported here: the package's __init__ may import this module before defining __version__.
    from . import __version__

    return {
        "vessel_kit": __version__,
        "torch": torch.__version__,
        "segmentation_models_pytorch": smp.__version__,
        "timm": timm.__version__,
    }


def _stage_reductions(timm_model: nn.Module) -> dict[str, int]:
    """Top-level child name -> its feature reduction, from a timm features model's feature_info.

    Feature models name children after the original modules with dots as underscores."""
    info = getattr(timm_model, "feature_info", None)
    if info is None:
        return {}
    return {entry["module"].replace(".", "_"): int(entry["reduction"]) for entry in info.get_dicts()}


def _weights_path(encoder_weights: str | os.PathLike | None) -> Path | None:
    """The local weights file named by ``encoder_weights``, refusing anything needing a download."""
    if encoder_weights is None:
        return None
    if isinstance(encoder_weights, (str, os.PathLike)) and Path(encoder_weights).suffix.lower() in WEIGHT_SUFFIXES:
        return existing_file(encoder_weights)
    raise ValueError(
        f"encoder_weights={encoder_weights!r} is not a local weights file ({', '.join(WEIGHT_SUFFIXES)}). "
        "Named pretrained weights such as 'imagenet' would need a download, and vessel_kit never downloads "
        "(it must run offline): save the encoder's weights to a file elsewhere and pass its path, or pass None "
        "for random initialisation."
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, unwrapping ``{"state_dict": ...}``-style containers."""
    try:
        if path.suffix.lower() == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors/torch raise many types for bad files; all mean "unreadable"
        raise ValueError(f"cannot read weights from {path}: {err}") from None
    while isinstance(state, dict) and any(isinstance(state.get(key), dict) for key in _STATE_DICT_WRAPPERS):
        state = next(state[key] for key in _STATE_DICT_WRAPPERS if isinstance(state.get(key), dict))
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    tensors = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path} holds no state dict of tensors")
    return tensors


def _strip_prefixes(key: str) -> str:
    """``key`` without leading wrapper prefixes (DDP, torch.compile, Lightning, smp encoder/timm)."""
    while key.startswith(_KEY_PREFIXES):
        key = key[next(len(p) for p in _KEY_PREFIXES if key.startswith(p)) :]
    return key


def _load_encoder_weights(encoder: nn.Module, path: Path) -> None:
    """Load the tensors of ``path`` that match ``encoder`` (after prefix stripping); raise when none
    or a wrongly shaped one matches, warn about encoder tensors left random and unused file tensors."""
    source = _read_state_dict(path)
    target = encoder.state_dict()
    by_name = {_strip_prefixes(key): key for key in target}
    stem = next((key for key, value in target.items() if value.ndim == 4), None)
    matched, unused, mismatched = {}, [], []
    for key, value in source.items():
        name = by_name.get(_strip_prefixes(key))
        if name is None:
            unused.append(key)
            continue
        fitted = _fit_tensor(value, target[name], adapt_channels=name == stem)
        if fitted is None:
            mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(target[name].shape)}")
        else:
            matched[name] = fitted
    if mismatched:
        raise ValueError(
            f"{path}: {len(mismatched)} tensors have the wrong shape for this encoder, e.g. {mismatched[:_SHOWN_KEYS]}"
        )
    if not matched:
        raise ValueError(
            f"{path}: no tensor matches the encoder (file keys e.g. {list(source)[:_SHOWN_KEYS]}; "
            f"encoder keys e.g. {list(target)[:_SHOWN_KEYS]})"
        )
    encoder.load_state_dict(matched, strict=False)
    missing = [key for key in target if key not in matched]
    notes = [f"{len(missing)} left random (e.g. {missing[:_SHOWN_KEYS]})"] if missing else []
    notes += [f"{len(unused)} file tensors unused (e.g. {unused[:_SHOWN_KEYS]})"] if unused else []
    if notes:
        message = f"{path}: loaded {len(matched)}/{len(target)} encoder tensors; " + "; ".join(notes)
        warnings.warn(message, UserWarning, stacklevel=3)


def _fit_tensor(value: torch.Tensor, target: torch.Tensor, *, adapt_channels: bool) -> torch.Tensor | None:
    """``value`` shaped like ``target``: as is, or (for the stem conv) with its input channels
    adapted as timm does (summed for 1 channel, repeated and rescaled otherwise); None if impossible."""
    if value.shape == target.shape:
        return value
    same_but_inputs = value.ndim == 4 and value.shape[0] == target.shape[0] and value.shape[2:] == target.shape[2:]
    if not (adapt_channels and same_but_inputs):
        return None
    try:
        return adapt_input_conv(target.shape[1], value)
    except NotImplementedError:
        return None


def _load_strict(model: nn.Module, tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Load ``tensors`` into ``model``, raising ValueError unless every tensor fits exactly (a
    tensor tied to a loaded one counts as loaded, since safetensors stores tied tensors once)."""
    state = model.state_dict()
    wrong = [
        f"{key} {tuple(value.shape)} vs {tuple(state[key].shape)}"
        for key, value in tensors.items()
        if key in state and value.shape != state[key].shape
    ]
    if wrong:
        raise ValueError(f"{path}: weights do not fit the config's model; wrong shapes e.g. {wrong[:_SHOWN_KEYS]}")
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    loaded = {state[key].data_ptr() for key in tensors if key in state}
    missing = [key for key in missing if state[key].data_ptr() not in loaded]
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not fit the config's model: {len(missing)} missing (e.g. {missing[:_SHOWN_KEYS]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:_SHOWN_KEYS]})"
        )
