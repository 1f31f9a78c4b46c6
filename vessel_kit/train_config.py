"""The options of a training run: ``TrainConfig``, with a ``model``, a ``crops`` (2D models) or
``patches`` (3D models) and an ``optim`` section, loadable from YAML with recipes and ``base:``
inheritance (``recipes.py``).

    base: synthetic_cpu                  # optional: start from a recipe or another YAML file
    data_root: demo_out/data             # data and run: top level
    out_dir: runs/synthetic_cpu
    model: {arch: unet, encoder: resnet18, in_chans: 3}     # ModelOptions
    crops: {crop_size: 128, augment: light, rotate_p: 0.2}  # data.CropConfig (in_chans: the model's)
    optim: {optimizer: adamw, lr: 2.0e-3, scheduler: onecycle, ema_decay: 0.98}  # optim.OptimConfig
    loss: 5th_place
    epochs: 12

A 3D model (``model: {spatial_dims: 3}``) trains on ``patches:`` (``patches.PatchConfig``) instead:

    model: {arch: resunet, spatial_dims: 3}
    patches: {patch_size: [32, 128, 128], rotate_p: 0.5, rotate_max_deg: 180}
    target_voxel_size_um: 63.08          # train at the test resolution (2D or 3D)
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

from .calibration import COMPONENT_SIZE_GRID, check_component_sizes, check_rule, check_tolerance
from .config_files import load_yaml_mapping
from .config_sections import check_option_types, section_from_mapping
from .data import CropConfig
from .infer_config import InferConfig
from .losses import build_loss
from .models import ModelConfig
from .normalize import Normalization
from .optim import OptimConfig
from .patches import PatchConfig
from .recipes import resolve_config
from .values import is_finite_real

__all__ = ["ModelOptions", "TrainConfig"]

T = TypeVar("T")

# Training's crop defaults where they differ from CropConfig's.
_CROP_DEFAULTS = {"crops_per_epoch": 2000}
_CROPS_IN_CHANS = {"in_chans": "crops take the model's channels; set model.in_chans",
                   "out_chans": "crops take the model's output planes; set model.out_chans"}


@dataclass(frozen=True)
class ModelOptions:
    """The ``model:`` section of a training config: what ``ModelConfig`` the run builds.

    ``arch`` is a registered architecture (``models.register_architecture``); ``encoder`` and
    ``model_kwargs`` go to its builder (the smp ones check them). ``encoder_weights`` is None
    (random init) or a local weights file. ``in_chans`` is odd (1 = 2D, 3/5 = 2.5D) and sets the
    crops' channels too; ``out_chans`` (odd, <= in_chans) the planes it predicts, and the crops'
    target slices. ``normalization`` is a ``Normalization.from_dict`` mapping.

    Example::

        options = ModelOptions(encoder="resnet18", in_chans=3)
        config = options.model_config(voxel_size_um=50.0, tile_size=256)  # what the checkpoint stores
    """

    arch: str = "unet"
    encoder: str = "resnet34"
    encoder_weights: str | None = None
    in_chans: int = 1
    out_chans: int = 1
    spatial_dims: int = 2
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    normalization: dict[str, Any] = field(default_factory=lambda: {"mode": "percentile", "low": 10.0, "high": 99.8})

    def __post_init__(self) -> None:
        # Building the ModelConfig checks every option; model_kwargs keep its canonical JSON form.
        object.__setattr__(self, "model_kwargs", self.model_config().model_kwargs)

    def model_config(self, *, voxel_size_um: float | None = None, tile_size: int = 512) -> ModelConfig:
        """The ``ModelConfig`` of a model trained with these options on ``tile_size`` crops of
        data at ``voxel_size_um``."""
        return ModelConfig(
            arch=self.arch, encoder=self.encoder, in_chans=self.in_chans,
            normalization=Normalization.from_dict(self.normalization), voxel_size_um=voxel_size_um,
            tile_size=tile_size, model_kwargs=self.model_kwargs, spatial_dims=self.spatial_dims,
            out_chans=self.out_chans,
        )


@dataclass
class TrainConfig:
    """Everything a training run needs; loadable from YAML (``TrainConfig.from_yaml``).

    Volumes are named as in the Kaggle layout under ``data_root``. ``soft_labels`` maps a volume
    name (train or test split) to a ``.npy`` of uint8 soft labels (0..255, e.g. from
    ``make_pseudo_labels``) used as its target instead of (or, for test volumes, in the absence
    of) its labels. ``model``, ``crops`` and ``optim`` are ``ModelOptions``, ``data.CropConfig``
    and ``optim.OptimConfig``, each given as the object or as a mapping of its options;
    ``crops.in_chans`` follows ``model.in_chans``. A 3D model (``model.spatial_dims`` 3) takes
    ``patches`` (``patches.PatchConfig``) instead of ``crops``; each is refused for the other
    kind of model, and the one not used is None. ``target_voxel_size_um`` resamples the training
    volumes once to that voxel size (cached under ``cache_dir``) so the model trains at the test
    resolution; validation volumes stay as they are (inference resamples them). ``infer`` holds
    the inference options (``InferConfig`` fields, e.g. a recipe's ``top_fraction``) that the
    checkpoints carry (metadata ``extra["infer"]``), so the recipe's inference goes with the model.
    ``members`` (an ensemble recipe's models and pseudo-label steps, each a partial config over
    these options) makes ``train`` run them in turn into ``out_dir/<name>`` (``members.py``). ``from_dict``/``from_yaml`` also take
    ``base:``/``recipe:`` and the flat keys of older configs (``recipes.py``).

    Example::

        config = TrainConfig.from_dict({"base": "synthetic_cpu", "data_root": "demo_out/data",
                                        "crops": {"crop_size": 96}, "epochs": 2})
        train(config)
    """

    data_root: str
    out_dir: str = "runs/unet"
    train_volumes: list[str] = field(default_factory=lambda: ["kidney_1_dense", "kidney_2"])
    val_volumes: list[str] = field(default_factory=lambda: ["kidney_3_dense"])
    volume_weights: dict[str, float] = field(default_factory=dict)
    soft_labels: dict[str, str] = field(default_factory=dict)
    cache_dir: str | None = None
    model: ModelOptions = field(default_factory=ModelOptions)
    crops: CropConfig | None = None  # None: the defaults, for 2D models
    patches: PatchConfig | None = None  # None: the defaults, for 3D models
    target_voxel_size_um: float | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: str | dict | list = "5th_place"  # see losses.build_loss
    infer: dict = field(default_factory=dict)  # InferConfig options stored in the checkpoints
    epochs: int = 20
    batch_size: int = 16
    amp: bool | None = None  # None: on for CUDA
    compile: bool = False  # torch.compile the training forward pass (models.compile_model)
    members: list[dict] = field(default_factory=list)  # an ensemble's members trained in turn (members.py)
    # runtime
    device: str | None = None  # None: the first usable device (devices.usable_devices)
    num_workers: int = 2
    seed: int = 0
    val_threshold: float | None = None  # None: calibrate on validation (stored in the checkpoint)
    # with the calibrated threshold, also the smallest 3D component kept, one of calibration_component_sizes
    calibrate_min_component_size: bool = True
    # the sizes it chooses from (voxels at the model's resolution, 0 keeps all; calibration.COMPONENT_SIZE_GRID)
    calibration_component_sizes: list[int] = field(default_factory=lambda: list(COMPONENT_SIZE_GRID))
    # > 0: the lowest threshold (and smallest component size) whose validation score is within this
    # of the best, instead of the best: unseen scans are under-segmented at the best (calibration.py)
    calibration_tolerance: float = 0.0
    # how the validation cases' scores make the threshold: "mean" (the best mean score) or
    # "case_median" (each case's own cut, then their median: calibration.py)
    calibration_rule: str = "mean"
    val_voxel_sizes_um: list[float] = field(default_factory=list)  # also validate resampled to these
    val_batch_size: int = 4
    # the best checkpoint is chosen on the validation score smoothed over epochs: s * previous + (1 - s) * this
    # epoch's (0: this epoch's alone; nnU-Net uses 0.9 over its 1000 epochs)
    val_score_smoothing: float = 0.0
    # epochs before this one (but the last, always validated) are not validated and cannot be the best:
    # a one-cycle run's early epochs are never its best, and on 2 CPU cores each validation costs ~20 %
    # of an epoch
    val_from_epoch: int = 0
    resume: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        check_option_types(TrainConfig, {f.name: getattr(self, f.name) for f in fields(self)})
        self.model = _section(ModelOptions, self.model, "model.")
        self.optim = _section(OptimConfig, self.optim, "optim.")
        self._check_samples()
        try:
            InferConfig.from_dict(self.infer)
        except ValueError as error:
            raise ValueError(f"training option infer: {error}") from None
        try:  # a misspelt loss fails here, not after the volumes are read
            build_loss(self.loss)
        except (TypeError, ValueError) as error:
            raise ValueError(f"training option loss: {error}") from None
        if self.num_workers < 0 or self.val_batch_size < 1:
            raise ValueError(f"num_workers must be >= 0 and val_batch_size >= 1, got {self.num_workers}, {self.val_batch_size}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if not self.train_volumes:
            raise ValueError("train_volumes is empty")
        step = self.batch_size * self.optim.accumulate_steps
        name, per_epoch = self.samples_per_epoch
        if per_epoch < step:
            raise ValueError(
                f"{name} ({per_epoch}) must hold at least one optimiser step "
                f"(batch_size x optim.accumulate_steps = {step})"
            )
        if self.target_voxel_size_um is not None and not 0 < self.target_voxel_size_um < math.inf:
            raise ValueError("target_voxel_size_um must be a positive voxel size in µm or null, "
                             f"got {self.target_voxel_size_um}")
        if self.val_threshold is not None and not 0.0 < self.val_threshold < 1.0:
            raise ValueError(f"val_threshold is a probability in (0, 1) or null (calibrate), got {self.val_threshold}")
        check_tolerance(self.calibration_tolerance, "calibration_tolerance")
        check_rule(self.calibration_rule, "calibration_rule")
        check_component_sizes(self.calibration_component_sizes, "calibration_component_sizes")
        if not 0.0 <= self.val_score_smoothing < 1.0:  # its type (a real, not a bool) is checked above
            raise ValueError(f"val_score_smoothing must be in [0, 1), got {self.val_score_smoothing!r}")
        if self.val_from_epoch < 0:
            raise ValueError(f"val_from_epoch must be an epoch number >= 0, got {self.val_from_epoch}")
        for size in self.val_voxel_sizes_um:
            if not (is_finite_real(size) and size > 0):
                raise ValueError(f"val_voxel_sizes_um must be positive voxel sizes in µm, got {self.val_voxel_sizes_um}")
        overlap = set(self.train_volumes) & set(self.val_volumes)
        if overlap:
            raise ValueError(f"volumes {sorted(overlap)} are in both train_volumes and val_volumes")
        if self.members:
            from .members import member_steps  # members.py trains through training.py, which imports this

            member_steps(self)  # every member's config checked now, not when its turn comes

    @property
    def samples_per_epoch(self) -> tuple[str, int]:
        """(option name, value) of the crops or patches drawn per epoch."""
        if self.patches is not None:
            return "patches.patches_per_epoch", self.patches.patches_per_epoch
        return "crops.crops_per_epoch", self.crops.crops_per_epoch

    @property
    def sample_size(self) -> int | tuple[int, int, int]:
        """The training tile: the crop side (2D) or the (D, H, W) patch size (3D)."""
        return self.patches.patch_size if self.patches is not None else self.crops.crop_size

    def _check_samples(self) -> None:
        """Fill in the section the model trains on; refuse the one it cannot use."""
        if self.model.spatial_dims == 3:
            if self.crops is not None:
                raise ValueError("training option crops is for 2D models; a 3D model (model.spatial_dims: 3) "
                                 "trains on patches: give patches instead")
            if self.model.in_chans != 1:
                raise ValueError(f"model.in_chans must be 1 for a 3D model (one intensity channel), got {self.model.in_chans}")
            self.patches = _section(PatchConfig, {} if self.patches is None else self.patches, "patches.")
            return
        if self.patches is not None:
            raise ValueError("training option patches is for 3D models (model.spatial_dims: 3); "
                             "a 2D model trains on crops: give crops instead")
        crops = _section(CropConfig, {} if self.crops is None else self.crops, "crops.",
                         defaults=_CROP_DEFAULTS, exclude=_CROPS_IN_CHANS)
        self.crops = dataclasses.replace(crops, in_chans=self.model.in_chans, out_chans=self.model.out_chans)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> TrainConfig:
        """The config a YAML file describes (relative ``base:`` paths start from its folder)."""
        return cls.from_dict(load_yaml_mapping(path, what="training config"), origin=path)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, origin: str | os.PathLike | None = None) -> TrainConfig:
        """A config from options: ``base:``/``recipe:`` chains merged and flat keys of older
        configs moved into their sections first (``recipes.resolve_config``); ``origin`` is the
        file they came from."""
        values = resolve_config(values, origin=origin)
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names, key=str)
        if unknown:
            raise ValueError(f"unknown training options {unknown}; valid options: {sorted(names)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The options in the nested form ``from_dict`` reads: ``crops.in_chans``/``out_chans`` left
        out (they are ``model``'s), and the one of ``crops``/``patches`` that the model does not use."""
        values = asdict(self)
        if self.crops is None:
            del values["crops"]
        else:
            del values["crops"]["in_chans"], values["crops"]["out_chans"], values["patches"]
        return values


def _section(cls: type[T], value: Any, prefix: str, *, defaults: Mapping[str, Any] | None = None,
             exclude: Mapping[str, str] | None = None) -> T:
    """``value`` as a ``cls``: as it is, or built from a mapping (``defaults`` under it)."""
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        value = {**(defaults or {}), **value}
    return section_from_mapping(cls, value, prefix=prefix, exclude=exclude)
