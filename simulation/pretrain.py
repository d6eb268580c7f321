"""Pretraining of the tiny backbone at the coordinating centre, on a generated public cohort.

UNICON keeps a pretrained foundation backbone frozen and trains only adapters and
heads. No pretrained weights of the ``tiny`` layout exist offline, so simulations
pretrain one here, before the federation starts, the way a CT foundation model is
trained on public scans before hospitals use it.

Public cohort
    Thoracic phantoms from :mod:`simulation.generate` (same anatomy, lesions, scanner
    effects and CT noise as the virtual hospitals), drawn from a random stream that
    the site generator never uses: site draws are seeded ``[seed, s, ...]`` with
    ``s`` in 0..5, the public cohort ``[seed, PUBLIC_COHORT_STREAM, ...]``. The cohort
    is rendered in memory and never contains a site's case. Each case is rendered on a
    scanner-like grid, then resampled to a RAS grid of 3.2-4.8 mm voxels (drawn per
    case, to cover the stage spacing and the rescaling of whole-volume tasks) and
    windowed like a site's CT. Half of the training crops are centred on a nodule.

Pretext tasks
    1. Tissue segmentation: a temporary decoder
       (:class:`unicon_model.heads.SegmentationHead`) predicts per voxel the phantom's
       tissue class: air, fat, soft tissue (heart and bladder included), lung, bone
       (marrow included) and nodule (the lung lesions). The loss is class-weighted
       Dice plus cross-entropy. This mirrors CT foundation models pretrained on public anatomy
       segmentations; the nodule class means the cohort is annotated for nodules, as
       public lung CT collections are.
    2. Denoising: a second temporary decoder predicts the correction from a CT with
       extra noise to the noise-free CT (L1 loss, weight ``reconstruction_weight``).
    3. Nodule size map: one encoder channel (``SIZE_MAP_CHANNEL`` of the levels in
       ``SIZE_MAP_LEVELS``) regresses, at each nodule voxel, log(1 + volume in ml) of
       that nodule and -1 elsewhere (weight ``size_map_weight``). Pooled heads read it
       through max and mean pooling; without it the pooled features of the frozen
       encoder did not separate lesion burdens (test AUC near 0.5 for the demo's
       classification task, against 0.8-0.97 with it, measured on 4 generated sites).

    The decoders are thrown away. Afterwards :func:`standardize_levels` rescales the
    weights so that every encoder level has unit RMS on public crops, without changing
    any prediction, because pretraining lets the deeper levels grow to RMS near 1000.

Output
    ``backbone.safetensors`` in the key layout of MONAI's ``SegResNet``
    (``convInit.conv.weight`` for the CT stem, ``down_layers.*`` for the encoder), which
    :func:`unicon_model.pretrained.load_backbone_checkpoint` reads, with
    two extra tensors, ``unicon.pooled_shift`` and ``unicon.pooled_scale``
    (:func:`pooled_statistics`, which pooled heads standardize their input with); and
    ``backbone.json``, a card with the pretext, settings, cache key, loss curve,
    held-out tissue Dice, level RMS before standardization, wall time and the file's
    SHA-256.

Cache
    :func:`cached_backbone` keeps one folder per settings hash,
    ``<cache_dir>/<cache key>/``, and reuses it while its card names the same key and
    the weights file still has the recorded SHA-256. Simulation presets use
    ``<parent of the run's out dir>/.pretrained/`` (``runs/.pretrained/`` for the
    default ``runs/<preset>-<time>`` out dirs).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from safetensors.torch import save_file
from scipy import ndimage
from torch import Tensor

from client.preprocess import fit_to_patch
from simulation.generate import (
    _IN_PLANE_SPACING_MM,
    _SLICE_SPACING_CHOICES_MM,
    AIR,
    BLADDER,
    BONE,
    DEFAULT_SHAPE,
    FAT,
    HEART,
    LUNG,
    MARROW,
    SOFT_TISSUE,
    CaseDraw,
    Grid,
    SiteProfile,
    _draw_phantom,
    render_ct,
    write_json,
)
from unicon_model.backbone import ResBlock
from unicon_model.heads import SegmentationHead, pool_levels
from unicon_model.log import get_logger
from unicon_model.model import BASE_MODALITY, UniconModel
from unicon_model.spec import BackboneConfig

logger = get_logger(__name__)

PRETRAIN_FORMAT_VERSION = 2
PUBLIC_COHORT_STREAM = 101
"""Second seed word of the public cohort's random streams (the site generator uses 0..5)."""

WEIGHTS_FILE = "backbone.safetensors"
CARD_FILE = "backbone.json"

TISSUE_CLASSES: tuple[str, ...] = ("air", "fat", "soft_tissue", "lung", "bone", "nodule")
NODULE_CLASS = TISSUE_CLASSES.index("nodule")

# Phantom tissue code -> pretext class; heart and bladder have soft-tissue density.
_TISSUE_TO_CLASS = np.zeros(8, dtype=np.int64)
for _code, _name in (
    (AIR, "air"),
    (FAT, "fat"),
    (SOFT_TISSUE, "soft_tissue"),
    (HEART, "soft_tissue"),
    (BLADDER, "soft_tissue"),
    (LUNG, "lung"),
    (BONE, "bone"),
    (MARROW, "bone"),
):
    _TISSUE_TO_CLASS[_code] = TISSUE_CLASSES.index(_name)


# Windowed CT noise is about 0.01-0.04 (15-60 HU over a 1400 HU window). Dividing the
# L1 error by this puts the reconstruction loss on the scale of the segmentation loss.
_RECONSTRUCTION_SCALE = 0.02
_NODULE_CENTRED_FRACTION = 0.5
# Loss weights of the tissue classes: the small classes (bone, nodule) weigh more so
# that they are learned within a few hundred steps.
_CLASS_WEIGHTS = (1.0, 2.0, 1.0, 2.0, 5.0, 10.0)
# The nodule size map: channel SIZE_MAP_CHANNEL of each encoder level in SIZE_MAP_LEVELS
# (stride 2**level) is trained to equal log(1 + volume in ml of that nodule) at nodule
# voxels and _SIZE_MAP_BACKGROUND elsewhere. Max pooling it gives the largest nodule and
# mean pooling the burden, so a pooled head can use them within a few rounds.
SIZE_MAP_LEVELS: tuple[int, ...] = (1,)
SIZE_MAP_CHANNEL = 0
# Nodule voxels weigh this much more than other voxels in the size-map loss.
_SIZE_MAP_NODULE_WEIGHT = 20.0
# Target outside nodules. Below zero, so the ReLU of a pooled head reads 0 there.
_SIZE_MAP_BACKGROUND = -1.0
# Mean squared size-map error (log ml) at which the size-map loss is 1.
_SIZE_MAP_MSE_SCALE = 0.05
_RMS_MOMENTUM = 0.1
_HELD_OUT_VOLUMES = 4
_LOG_EVERY = 10


class PretrainError(ValueError):
    """Pretraining settings that cannot be used, or a cache folder that cannot be written."""


def _tiny_backbone() -> BackboneConfig:
    return BackboneConfig.preset("tiny")


@dataclass(frozen=True)
class PretrainSettings:
    """Everything that changes the pretrained weights; its hash is the cache key.

    Attributes
    ----------
    backbone : BackboneConfig
        Encoder layout (default ``tiny``); must match the curriculum's ``model.backbone``.
    steps : int
        Optimizer steps (default 600).
    batch_size : int
        Patches per step.
    learning_rate : float
        Adam learning rate, cosine-decayed to zero over ``steps``.
    num_volumes : int
        Public training volumes rendered once and cropped at random.
    patch_size : tuple of 3 int
        Crop size in voxels; each side a multiple of the encoder's size divisor.
    spacing_mm : tuple of 2 float
        Range of the isotropic voxel size (mm) each public volume is resampled to.
    ct_window : tuple of 2 float
        Hounsfield units mapped to 0 and 1, as in the stage preprocessing.
    noise_hu : tuple of 2 float
        Range of the standard deviation (HU) of the CT noise in the input.
    reconstruction_weight : float
        Weight of the denoising loss next to the tissue segmentation loss.
    size_map_weight : float
        Weight of the nodule size-map loss next to the tissue segmentation loss.
    whole_volume_size : tuple of 3 int
        Size each public volume is fitted to (aspect ratio kept, then padded) when the
        pooled-feature statistics are measured: the ``patch_size`` of the stages whose
        pooled heads read whole volumes.
    seed : int
        Seed of the public cohort, the crops and the initialization.
    """

    backbone: BackboneConfig = field(default_factory=_tiny_backbone)
    steps: int = 600
    batch_size: int = 4
    learning_rate: float = 1e-2
    num_volumes: int = 96
    patch_size: tuple[int, int, int] = (24, 24, 24)
    spacing_mm: tuple[float, float] = (3.2, 4.8)
    ct_window: tuple[float, float] = (-1000.0, 400.0)
    noise_hu: tuple[float, float] = (15.0, 60.0)
    reconstruction_weight: float = 0.3
    size_map_weight: float = 1.0
    whole_volume_size: tuple[int, int, int] = (32, 32, 32)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "num_volumes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PretrainError(
                    f"PretrainSettings.{name} is {value!r}; give an integer of at least 1"
                )
        divisor = self.backbone.size_divisor
        if len(self.patch_size) != 3 or any(side % divisor or side < 1 for side in self.patch_size):
            raise PretrainError(
                f"PretrainSettings.patch_size is {self.patch_size!r}; give three positive sizes, "
                f"each a multiple of {divisor} for this backbone"
            )
        if len(self.whole_volume_size) != 3 or any(
            side % divisor or side < 1 for side in self.whole_volume_size
        ):
            raise PretrainError(
                f"PretrainSettings.whole_volume_size is {self.whole_volume_size!r}; give three "
                f"positive sizes, each a multiple of {divisor} for this backbone"
            )
        low, high = self.spacing_mm
        if not 0 < low <= high:
            raise PretrainError(
                f"PretrainSettings.spacing_mm is {self.spacing_mm!r}; give (low, high) in mm "
                "with 0 < low <= high"
            )
        if not self.ct_window[0] < self.ct_window[1]:
            raise PretrainError(
                f"PretrainSettings.ct_window is {self.ct_window!r}; give (low, high) HU with "
                "low < high"
            )
        if not 0 <= self.noise_hu[0] <= self.noise_hu[1]:
            raise PretrainError(
                f"PretrainSettings.noise_hu is {self.noise_hu!r}; give (low, high) HU with "
                "0 <= low <= high"
            )
        if not self.learning_rate > 0:
            raise PretrainError(
                f"PretrainSettings.learning_rate is {self.learning_rate!r}; give a positive number"
            )
        for name in ("reconstruction_weight", "size_map_weight"):
            if not getattr(self, name) >= 0:
                raise PretrainError(
                    f"PretrainSettings.{name} is {getattr(self, name)!r}; give a number >= 0"
                )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise PretrainError(
                f"PretrainSettings.seed is {self.seed!r}; give a non-negative integer"
            )

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as JSON-ready values."""
        raw = dataclasses.asdict(self)
        raw["backbone"] = self.backbone.to_dict()
        return {
            name: list(value) if isinstance(value, tuple) else value
            for name, value in raw.items()
        }

    def cache_key(self) -> str:
        """Return the first 16 hex digits of the SHA-256 of the settings and format version."""
        text = json.dumps(
            {"format_version": PRETRAIN_FORMAT_VERSION, **self.to_dict()}, sort_keys=True
        )
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass
class PublicVolume:
    """One rendered public case on its pretraining grid, all arrays ``(D, H, W)``."""

    image: npt.NDArray[np.float32]
    clean: npt.NDArray[np.float32]
    tissue: npt.NDArray[np.int64]
    size_map: npt.NDArray[np.float32]
    spacing_mm: float


@dataclass
class PretrainResult:
    """Paths of the pretrained weights and their card, and the card's content."""

    weights: Path
    card_path: Path
    card: dict[str, Any]
    reused: bool = False


# ---------------------------------------------------------------------------
# Public cohort
# ---------------------------------------------------------------------------


def render_public_volume(settings: PretrainSettings, index: int) -> PublicVolume:
    """Render public case ``index`` of the cohort seeded by ``settings.seed``.

    The case is drawn like a site's case (random body, lesions of either class, HU
    offset and scale) and rendered without noise on a scanner-like grid. It then gets
    Gaussian noise of ``settings.noise_hu`` there and is resampled (linear) to a RAS
    grid with isotropic voxels drawn from ``settings.spacing_mm``. Tissue classes are evaluated
    at the target voxel centres.
    """
    rng = np.random.default_rng([settings.seed, PUBLIC_COHORT_STREAM, index])
    in_plane = float(rng.uniform(*_IN_PLANE_SPACING_MM))
    slice_spacing = float(rng.choice(_SLICE_SPACING_CHOICES_MM))
    source_spacing = (in_plane, in_plane, slice_spacing)
    field_of_view = np.array(DEFAULT_SHAPE, dtype=float) * np.array(source_spacing)
    centre = np.array([rng.uniform(-5.0, 5.0), rng.uniform(-30.0, -10.0), rng.uniform(-400.0, -100.0)])

    phantom = _draw_phantom(rng, int(rng.uniform() < 0.5), centre, field_of_view / 2.0)
    source = Grid.centred(DEFAULT_SHAPE, source_spacing, centre, lps=bool(rng.uniform() < 0.5))
    case = CaseDraw(
        case_id=f"public-{index:04d}",
        patient_id=f"public-{index:04d}",
        phantom=phantom,
        ct_grid=source,
        pet_grid=source,
        ct_lps=False,
        pet_lps=False,
        render_seed=(settings.seed, PUBLIC_COHORT_STREAM, index),
    )
    # Noise is added below, so the clean image is the reconstruction target.
    profile = SiteProfile(
        name="public",
        index=0,
        num_cases=1,
        positive_fraction=0.5,
        field_of_view_mm=(float(field_of_view[0]), float(field_of_view[1]), float(field_of_view[2])),
        ct_spacing_mm=source_spacing,
        pet_spacing_mm=source_spacing,
        hu_offset=float(rng.uniform(-20.0, 20.0)),
        hu_scale=float(rng.uniform(0.97, 1.03)),
        ct_noise_hu=0.0,
        pet_noise=0.0,
        suv_calibration=1.0,
        pet_fraction=0.0,
        tasks=(),
    )
    rendered, _ = render_ct(case, profile, rng)
    clean_hu = rendered.astype(np.float64)
    noisy_hu = clean_hu + rng.normal(0.0, rng.uniform(*settings.noise_hu), clean_hu.shape)

    # Target grid: RAS axes, isotropic voxels, same centre and field of view.
    spacing = float(rng.uniform(*settings.spacing_mm))
    shape = tuple(math.ceil(extent / spacing) for extent in field_of_view)
    target = Grid.centred(shape, (spacing, spacing, spacing), centre, lps=False)
    world = target.world()
    source_index = np.tensordot(
        np.linalg.inv(source.affine[:3, :3]), world - source.affine[:3, 3, None, None, None], axes=1
    )

    low, high = settings.ct_window

    def window(hu: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
        resampled = ndimage.map_coordinates(hu, source_index, order=1, mode="nearest")
        return np.clip((resampled - low) / (high - low), 0.0, 1.0).astype(np.float32)

    codes = phantom.tissues(world)
    tissue = _TISSUE_TO_CLASS[codes]
    for _, inside, _ in phantom.lesion_regions(world, codes):
        tissue[inside] = NODULE_CLASS
    return PublicVolume(
        image=window(noisy_hu),
        clean=window(clean_hu),
        tissue=tissue,
        size_map=nodule_size_map(tissue == NODULE_CLASS, spacing),
        spacing_mm=spacing,
    )


def nodule_size_map(nodules: npt.NDArray[np.bool_], spacing_mm: float) -> npt.NDArray[np.float32]:
    """Return ``log(1 + ml)`` of each voxel's connected nodule (26-connectivity), 0 outside."""
    components, count = ndimage.label(nodules, structure=np.ones((3, 3, 3)))
    voxels = np.bincount(components.ravel(), minlength=count + 1).astype(np.float64)
    size = np.log1p(voxels * spacing_mm**3 / 1000.0)
    size[0] = 0.0
    return size[components].astype(np.float32)


def _random_patch(
    volume: PublicVolume, patch_size: tuple[int, int, int], rng: np.random.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Crop a random patch (zero-padded like a site's volume) with random left-right flips.

    Returns the image and clean image ``(1, D, H, W)``, tissue classes ``(D, H, W)`` and
    the nodule size map ``(D, H, W)``.
    """
    # Volumes smaller than the patch are zero-padded on both sides, as a site pads them.
    extra = [max(0, size - side) for size, side in zip(patch_size, volume.image.shape, strict=True)]
    padding = [(pad // 2, pad - pad // 2) for pad in extra]
    arrays = [
        np.pad(array, padding)
        for array in (volume.image, volume.clean, volume.tissue, volume.size_map)
    ]
    shape = arrays[0].shape

    # Half of the patches are centred on a nodule voxel, because nodules fill about
    # 0.3 % of a volume and uniform crops would rarely show the network one.
    nodules = np.argwhere(arrays[2] == NODULE_CLASS)
    if len(nodules) and rng.uniform() < _NODULE_CENTRED_FRACTION:
        centre = nodules[int(rng.integers(len(nodules)))]
        starts = [
            int(np.clip(c - size // 2, 0, side - size))
            for c, size, side in zip(centre, patch_size, shape, strict=True)
        ]
    else:
        starts = [int(rng.integers(0, side - size + 1)) for side, size in zip(shape, patch_size, strict=True)]
    region = tuple(slice(start, start + size) for start, size in zip(starts, patch_size, strict=True))
    crops = [array[region] for array in arrays]
    if rng.uniform() < 0.5:
        crops = [np.flip(array, axis=0) for array in crops]
    image, clean, tissue, size_map = (torch.from_numpy(np.ascontiguousarray(a)) for a in crops)
    return image[None], clean[None], tissue, size_map


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


class _PretextNetwork(torch.nn.Module):
    """CT stem and encoder of a fresh :class:`UniconModel`, plus the temporary pretext heads.

    The two decoders are separate because a decoder of ``init_filters`` channels is too
    narrow to serve both dense tasks: with one shared decoder the denoising term stalled
    the tissue segmentation. The nodule size map has no readout weights: it is one
    encoder channel itself, so that its values, not a trained readout's weights, carry
    the nodule sizes that a downstream pooled head reads.
    """

    def __init__(self, backbone: BackboneConfig) -> None:
        super().__init__()
        if backbone.num_levels <= max(SIZE_MAP_LEVELS):
            raise PretrainError(
                f"the backbone has {backbone.num_levels} levels; the nodule size maps need "
                f"levels {SIZE_MAP_LEVELS}, so use at least {max(SIZE_MAP_LEVELS) + 1} levels"
            )
        self.model = UniconModel(backbone)
        self.tissue_decoder = SegmentationHead(backbone, len(TISSUE_CLASSES))
        self.denoising_decoder = SegmentationHead(backbone, 1)
        self.size_map_rms: Tensor
        self.register_buffer("size_map_rms", torch.ones(len(SIZE_MAP_LEVELS)))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Run the pretext heads on CT ``(B, 1, D, H, W)``.

        Returns tissue logits and a denoising residual ``(B, K + 1, D, H, W)``, and one
        nodule size map ``(B, D / s, H / s, W / s)`` per level in ``SIZE_MAP_LEVELS``,
        with ``s = 2**level``.
        """
        features = self.model.backbone(self.model.stems[BASE_MODALITY](x))
        dense = torch.cat([self.tissue_decoder(features), self.denoising_decoder(features)], dim=1)

        # The level is read at unit RMS (a running mean of the batch RMS), the scale that
        # standardize_levels builds into the weights at the end. So the map keeps its size
        # relative to the channels a downstream head receives. There is no ReLU here
        # because a ReLU readout stalls at zero where its input turns negative.
        levels = [features[level] for level in SIZE_MAP_LEVELS]
        if self.training:
            rms = torch.stack([level.detach().pow(2).mean().sqrt() for level in levels])
            self.size_map_rms.mul_(1.0 - _RMS_MOMENTUM).add_(_RMS_MOMENTUM * rms)
        maps = [
            level[:, SIZE_MAP_CHANNEL] / self.size_map_rms[index]
            for index, level in enumerate(levels)
        ]
        return dense, maps


def _losses(
    outputs: tuple[Tensor, list[Tensor]],
    batch: dict[str, Tensor],
    dice_ce: DiceCELoss,
    settings: PretrainSettings,
) -> dict[str, Tensor]:
    dense, size_maps = outputs
    logits, residual = dense[:, :-1], dense[:, -1:]
    losses = {"segmentation": dice_ce(logits, batch["tissue"][:, None])}

    # The last channel predicts the correction to the noisy input (residual learning),
    # so an untrained network starts at the input's own error instead of far above it.
    denoised = batch["image"] + residual
    losses["denoising"] = F.l1_loss(denoised, batch["clean"]) / _RECONSTRUCTION_SCALE

    # Max pooling keeps each nodule's value on the coarser grid of each size map.
    size_map_losses = []
    for level, predicted in zip(SIZE_MAP_LEVELS, size_maps, strict=True):
        stride = 2**level
        size = F.max_pool3d(batch["size_map"][:, None], stride)[:, 0]  # (B, d, h, w)
        nodule = size > 0
        target = torch.where(nodule, size, _SIZE_MAP_BACKGROUND)
        weights = 1.0 + (_SIZE_MAP_NODULE_WEIGHT - 1.0) * nodule.float()
        squared_error = weights * (predicted - target).pow(2)
        size_map_losses.append(squared_error.sum() / weights.sum() / _SIZE_MAP_MSE_SCALE)
    losses["size_map"] = torch.stack(size_map_losses).mean()

    losses["loss"] = (
        losses["segmentation"]
        + settings.reconstruction_weight * losses["denoising"]
        + settings.size_map_weight * losses["size_map"]
    )
    return losses


@torch.no_grad()
def _held_out_dice(network: _PretextNetwork, volumes: Sequence[PublicVolume], divisor: int) -> dict[str, float]:
    """Return the Dice of each tissue class over the held-out volumes (whole volumes, padded)."""
    network.eval()
    intersection = np.zeros(len(TISSUE_CLASSES))
    total = np.zeros(len(TISSUE_CLASSES))
    for volume in volumes:
        shape = volume.image.shape
        padded = [int(math.ceil(side / divisor) * divisor) for side in shape]
        image = np.pad(volume.image, [(0, p - s) for p, s in zip(padded, shape, strict=True)])
        logits = network(torch.from_numpy(image)[None, None])[0][0, :-1]
        predicted = logits.argmax(dim=0).numpy()[: shape[0], : shape[1], : shape[2]]
        for k in range(len(TISSUE_CLASSES)):
            intersection[k] += np.sum((predicted == k) & (volume.tissue == k))
            total[k] += np.sum(predicted == k) + np.sum(volume.tissue == k)
    network.train()
    return {
        name: round(float(2 * intersection[k] / total[k]), 4) if total[k] else float("nan")
        for k, name in enumerate(TISSUE_CLASSES)
    }


@torch.no_grad()
def standardize_levels(model: UniconModel, images: Tensor) -> list[float]:
    """Rescale the CT stem and encoder so that every level's output has RMS 1 on ``images``.

    Pretraining lets feature magnitudes grow level by level (the residual sums are not
    normalized), to RMS values near 1000 at the deepest level, which makes the logits of
    a freshly initialized pooled head explode. The rescaling changes no prediction of
    the network: level ``i``'s output is multiplied by ``a_i = 1 / RMS_i`` by scaling the
    convolution that opens the level (the CT stem at level 0) by ``a_i / a_(i-1)`` and
    each residual block's ``conv2`` by ``a_i``. Every block normalizes its input before
    ``conv1``, so the blocks' outputs scale with ``conv2`` alone, and the next level's
    opening convolution undoes ``a_i``. Equality holds up to the GroupNorm epsilon.

    Parameters
    ----------
    model : UniconModel
        Model whose ``stems.ct`` and ``backbone`` are rescaled in place.
    images : Tensor
        CT batch ``(B, 1, D, H, W)`` on which the RMS of each level is measured.

    Returns
    -------
    list of float
        RMS of each level's output before the rescaling, finest level first.
    """
    features = model.backbone(model.stems[BASE_MODALITY](images))
    rms = [float(feature.pow(2).mean().sqrt()) for feature in features]
    previous = 1.0
    for level, layer in enumerate(model.backbone.down_layers):
        modules: list[torch.nn.Module] = list(cast(torch.nn.Sequential, layer))
        factor = 1.0 / rms[level]
        opening = model.stems[BASE_MODALITY] if level == 0 else modules[0]
        for parameter in opening.parameters():
            parameter.mul_(factor / previous)
        for block in modules[1:]:
            for parameter in cast(ResBlock, block).conv2.parameters():
                parameter.mul_(factor)
        previous = factor
    return rms


def pooled_statistics(
    model: UniconModel, volumes: Sequence[PublicVolume], size: tuple[int, int, int]
) -> tuple[Tensor, Tensor]:
    """Measure the shift and scale of the pooled features on whole public volumes.

    Each volume is fitted to ``size`` as a classification or prognosis stage fits a
    site's volume, encoded, and pooled like :class:`unicon_model.heads.PooledHead`
    (mean and max of every activated channel of every level). The shift is the mean of
    each pooled feature over the volumes, the scale its standard deviation, floored at
    a tenth of the median standard deviation so that nearly constant features are not
    blown up into noise.

    Returns
    -------
    tuple of Tensor
        Shift and scale, each ``(2 * sum(level channels),)``.
    """
    rows: list[Tensor] = []
    model.eval()
    with torch.no_grad():
        for volume in volumes:
            image = fit_to_patch(torch.from_numpy(volume.image)[None], size)[None]
            features = model.backbone(model.stems[BASE_MODALITY](image))
            rows.append(pool_levels(features)[0])
    table = torch.stack(rows)  # (volumes, features)
    shift = table.mean(dim=0)
    spread = table.std(dim=0)
    scale = spread.clamp_min(max(float(spread.median()) * 0.1, 1e-6))
    return shift.contiguous(), scale.contiguous()


def segresnet_state(model: UniconModel) -> dict[str, Tensor]:
    """Return the CT stem and encoder of ``model`` under MONAI ``SegResNet`` key names."""
    state: dict[str, Tensor] = {
        "convInit.conv.weight": model.stems[BASE_MODALITY].get_parameter("conv.weight")
    }
    for name, value in model.backbone.named_parameters():
        state[name] = value
    return {name: value.detach().clone().contiguous() for name, value in state.items()}


def _atomic_save_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, temp_name, metadata=metadata)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _train(
    settings: PretrainSettings,
    training: Sequence[PublicVolume],
    held_out: Sequence[PublicVolume],
    rng: np.random.Generator,
) -> tuple[_PretextNetwork, list[dict[str, float]], dict[str, float], list[float]]:
    """Run the pretext training; return the standardized network, loss curve, Dice, level RMS."""
    curve: list[dict[str, float]] = []
    with torch.random.fork_rng():
        torch.manual_seed(settings.seed)
        network = _PretextNetwork(settings.backbone)
        optimizer = torch.optim.Adam(network.parameters(), lr=settings.learning_rate)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.steps)
        dice_ce = DiceCELoss(
            to_onehot_y=True, softmax=True, batch=True, weight=torch.tensor(_CLASS_WEIGHTS)
        )
        network.train()
        window: list[dict[str, float]] = []
        for step in range(1, settings.steps + 1):
            patches = [
                _random_patch(training[int(rng.integers(len(training)))], settings.patch_size, rng)
                for _ in range(settings.batch_size)
            ]
            batch = {
                name: torch.stack([patch[position] for patch in patches])
                for position, name in enumerate(("image", "clean", "tissue", "size_map"))
            }  # image, clean (B, 1, D, H, W); tissue, size_map (B, D, H, W)

            optimizer.zero_grad(set_to_none=True)
            losses = _losses(network(batch["image"]), batch, dice_ce, settings)
            loss = losses["loss"]
            if not torch.isfinite(loss):
                raise PretrainError(
                    f"pretraining loss became {loss.item()} at step {step}; lower "
                    f"PretrainSettings.learning_rate (now {settings.learning_rate})"
                )
            loss.backward()
            optimizer.step()
            schedule.step()

            window.append({name: value.item() for name, value in losses.items()})
            if step % _LOG_EVERY == 0 or step == settings.steps:
                means = {
                    name: round(float(np.mean([entry[name] for entry in window])), 5)
                    for name in window[0]
                }
                curve.append({"step": step, **means})
                window = []
                logger.debug("pretrain: step %d loss %.4f", step, means["loss"])
        dice = _held_out_dice(network, held_out, settings.backbone.size_divisor)
        sample = torch.stack(
            [_random_patch(volume, settings.patch_size, rng)[0] for volume in training[:8]]
        )
        level_rms = standardize_levels(network.model, sample)

    return network, curve, dice, level_rms


def pretrain_backbone(settings: PretrainSettings, out_dir: Path) -> PretrainResult:
    """Pretrain the CT stem and encoder on the public cohort and write weights plus card.

    Parameters
    ----------
    settings : PretrainSettings
        Pretraining recipe.
    out_dir : Path
        Folder for ``backbone.safetensors`` and ``backbone.json`` (created if missing;
        existing files of the same names are replaced).

    Returns
    -------
    PretrainResult
        Paths of the two files and the card.
    """
    started = time.monotonic()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    volumes = [render_public_volume(settings, i) for i in range(settings.num_volumes + _HELD_OUT_VOLUMES)]
    training, held_out = volumes[: settings.num_volumes], volumes[settings.num_volumes :]
    render_s = time.monotonic() - started
    logger.info(
        "pretrain: rendered %d public volumes (%d held out) in %.1f s",
        len(volumes), len(held_out), render_s,
    )

    rng = np.random.default_rng([settings.seed, PUBLIC_COHORT_STREAM, 1 << 20])
    threads = torch.get_num_threads()
    # One thread: on a 2-core machine shared with other processes, two threads ran
    # several times slower per step than one (small 3D convolutions, oversubscription).
    torch.set_num_threads(1)
    try:
        network, curve, dice, level_rms = _train(settings, training, held_out, rng)
    finally:
        torch.set_num_threads(threads)

    weights_path = out_dir / WEIGHTS_FILE
    tensors = segresnet_state(network.model)
    shift, scale = pooled_statistics(network.model, training, settings.whole_volume_size)
    tensors["unicon.pooled_shift"], tensors["unicon.pooled_scale"] = shift, scale
    _atomic_save_safetensors(
        tensors, weights_path, {"format": "monai-segresnet-encoder", "cache_key": settings.cache_key()}
    )
    wall_s = round(time.monotonic() - started, 1)
    card: dict[str, Any] = {
        "format": "unicon-pretrained-backbone",
        "format_version": PRETRAIN_FORMAT_VERSION,
        "cache_key": settings.cache_key(),
        "weights": WEIGHTS_FILE,
        "sha256": _sha256(weights_path),
        "layout": "monai.networks.nets.SegResNet encoder (convInit, down_layers)",
        "pretext": {
            "cohort": (
                f"{settings.num_volumes} generated public thoracic CT phantoms (simulation.generate "
                f"anatomy) from seed stream [{settings.seed}, {PUBLIC_COHORT_STREAM}, case], which "
                "site generation never uses; "
                f"{_HELD_OUT_VOLUMES} more held out for the Dice below"
            ),
            "tasks": (
                "per-voxel tissue segmentation (Dice + cross-entropy) and denoising of the CT "
                "(L1 to the noise-free image), each through a temporary decoder that is not "
                "saved; a nodule size map (log(1 + ml) of each nodule at its voxels) in "
                f"channel {SIZE_MAP_CHANNEL} of encoder levels {list(SIZE_MAP_LEVELS)}"
            ),
            "tissue_classes": list(TISSUE_CLASSES),
        },
        "settings": settings.to_dict(),
        "steps": settings.steps,
        "seed": settings.seed,
        "loss_curve": curve,
        "held_out_dice": dice,
        "level_rms_before_standardization": [round(value, 4) for value in level_rms],
        "pooled_statistics": (
            f"unicon.pooled_shift and unicon.pooled_scale: mean and standard deviation of the "
            f"{shift.numel()} pooled features over the {len(training)} training volumes fitted "
            f"to {list(settings.whole_volume_size)}"
        ),
        "render_time_s": round(render_s, 1),
        "wall_time_s": wall_s,
        "torch_threads": 1,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    card_path = out_dir / CARD_FILE
    write_json(card_path, card)
    logger.info(
        "pretrain: %d steps in %.1f s, loss %.3f -> %.3f, held-out nodule Dice %s; wrote %s",
        settings.steps, wall_s, curve[0]["loss"], curve[-1]["loss"], dice["nodule"], weights_path,
    )
    return PretrainResult(weights=weights_path, card_path=card_path, card=card)


def read_card(folder: Path) -> dict[str, Any] | None:
    """Return the card in ``folder``, or None when it is missing or not valid JSON."""
    path = Path(folder) / CARD_FILE
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return card if isinstance(card, dict) else None


def cached_backbone(settings: PretrainSettings, cache_dir: Path) -> PretrainResult:
    """Return the pretrained backbone for ``settings``, pretraining only on a cache miss.

    The entry is ``<cache_dir>/<settings.cache_key()>/``. It is reused when its card
    names the same cache key and ``backbone.safetensors`` has the SHA-256 the card
    records. Otherwise the backbone is pretrained again and the entry overwritten.
    """
    folder = Path(cache_dir) / settings.cache_key()
    card = read_card(folder)
    weights = folder / WEIGHTS_FILE
    if (
        card is not None
        and card.get("cache_key") == settings.cache_key()
        and weights.is_file()
        and card.get("sha256") == _sha256(weights)
    ):
        logger.info("pretrain: reusing %s (cache key %s)", weights, settings.cache_key())
        return PretrainResult(weights=weights, card_path=folder / CARD_FILE, card=card, reused=True)
    if card is not None:
        logger.warning("pretrain: cache entry %s is stale or incomplete; pretraining again", folder)
    try:
        return pretrain_backbone(settings, folder)
    except OSError as error:
        raise PretrainError(
            f"cannot write the pretrained backbone to {folder}: {error}; pass a writable cache folder"
        ) from error


def main(argv: Sequence[str] | None = None) -> int:
    """Pretrain a backbone from the command line and print the weights path."""
    parser = argparse.ArgumentParser(
        prog="python -m simulation.pretrain",
        description="Pretrain the tiny backbone on a generated public CT cohort "
        "(tissue segmentation plus denoising) and write backbone.safetensors and backbone.json.",
    )
    parser.add_argument("cache_dir", type=Path, help="cache folder; the files go to CACHE_DIR/<cache key>/")
    defaults = PretrainSettings()
    parser.add_argument("--steps", type=int, default=defaults.steps, help=f"optimizer steps (default: {defaults.steps})")
    parser.add_argument("--volumes", type=int, default=defaults.num_volumes, help=f"public training volumes (default: {defaults.num_volumes})")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the public cohort (default: 0)")
    args = parser.parse_args(argv)
    try:
        settings = PretrainSettings(steps=args.steps, num_volumes=args.volumes, seed=args.seed)
        result = cached_backbone(settings, args.cache_dir)
    except PretrainError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(result.weights)
    return 0


if __name__ == "__main__":
    sys.exit(main())
