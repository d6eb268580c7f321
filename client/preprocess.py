"""Preprocessing of a site's cases into tensors, with a per-case cache.

A case goes through two parts:

1. Deterministic, cached in ``state_dir/cache/<task>/`` as safetensors plus JSON.
   Decoding applies the scaling and fault fixes of ``client.nifti`` and pairs files
   by affine: for PET/CT the CT is the reference grid, and the PET and a PET-grid
   label are resampled onto it. MONAI dictionary transforms then reorient to RAS,
   resample to ``PreprocessConfig.spacing`` (linear for images, nearest for labels)
   and normalize the intensity of each channel:

   - CT: Hounsfield window ``ct_window`` scaled to [0, 1], values outside clipped;
   - PET: SUV divided by ``suv_scale``. Negative SUV (reconstruction noise and
     interpolation undershoot; activity cannot be negative) is clipped to 0 first.
     There is no upper clip, so values are in [0, max SUV / suv_scale].

   The cache key hashes every file's path, size and modification time with the
   settings that change the result, so a changed file or setting is recomputed and
   later rounds do not decode NIfTI again.

2. Per kind, on every access:

   - classification and prognosis: the whole volume, resized with its aspect ratio
     kept so that it fits ``patch_size``, then zero-padded (centred) to ``patch_size``;
   - segmentation, training: one foreground-aware random crop of ``patch_size``
     (MONAI ``RandCropByPosNegLabeld``, foreground and background centres equally
     likely), after padding volumes smaller than the patch;
   - segmentation, evaluation: the whole volume, padded so that every spatial size is
     a multiple of 16. Shapes then differ per case, so evaluate with batch size 1.

Splits: a manifest's ``split`` column is used when set. Otherwise each patient goes
to ``train``, ``val`` or ``test`` by a hash of the seed and the patient id mapped to
[0, 1): below 0.7 train, below 0.85 val, else test. All cases of a patient share a
split, the result does not depend on row order or on the other patients, and when no
patient lands in train the patient with the smallest hash value is moved there.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    DivisiblePadd,
    MapTransform,
    Orientationd,
    RandCropByPosNegLabeld,
    Resize,
    Spacingd,
    SpatialPad,
    SpatialPadd,
)
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from client.formats import SPLITS, CaseRecord, DatasetError, read_cases
from client.nifti import MODALITY_CHANNELS, describe_issues, load_case_volumes
from client.site_config import DatasetConfig, SiteConfig
from unicon_model.log import get_logger

logger = get_logger(__name__)

# Bump when the deterministic part changes, so that old cache entries are recomputed.
CACHE_VERSION = 1
SPLIT_FRACTIONS = (("train", 0.7), ("val", 0.15), ("test", 0.15))
EVAL_DIVISOR = 16


class CaseDataError(ValueError):
    """A case cannot be preprocessed because its files have errors."""


class PreprocessConfigError(ValueError):
    """A preprocessing setting is invalid."""


@dataclass(frozen=True)
class PreprocessConfig:
    """Settings of the preprocessing of one stage.

    Attributes
    ----------
    spacing : tuple[float, float, float]
        Target voxel spacing in mm along R, A, S (default 3 mm isotropic).
    patch_size : tuple[int, int, int]
        Training crop (segmentation) or whole-volume size (classification, prognosis).
    ct_window : tuple[float, float]
        Hounsfield units mapped to 0 and 1 (default -1000..400); values outside are clipped.
    suv_scale : float
        PET SUV is divided by this (default 10).
    """

    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)
    patch_size: tuple[int, int, int] = (32, 32, 32)
    ct_window: tuple[float, float] = (-1000.0, 400.0)
    suv_scale: float = 10.0

    def __post_init__(self) -> None:
        if len(self.spacing) != 3 or not all(float(s) > 0 for s in self.spacing):
            raise PreprocessConfigError(
                f"preprocess spacing is {self.spacing!r}; give three positive sizes in mm"
            )
        if len(self.patch_size) != 3 or not all(int(s) >= 1 for s in self.patch_size):
            raise PreprocessConfigError(
                f"preprocess patch_size is {self.patch_size!r}; give three positive voxel counts"
            )
        if len(self.ct_window) != 2 or not float(self.ct_window[0]) < float(self.ct_window[1]):
            raise PreprocessConfigError(
                f"preprocess ct_window is {self.ct_window!r}; give (low, high) HU with low < high"
            )
        if not float(self.suv_scale) > 0:
            raise PreprocessConfigError(
                f"preprocess suv_scale is {self.suv_scale!r}; give a positive number"
            )


# --------------------------------------------------------------------------- splits


def _split_position(patient_id: str, seed: int) -> float:
    """Map (seed, patient id) to [0, 1) with SHA-256, stable across machines and runs."""
    digest = hashlib.sha256(f"{seed}:{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(cases: Sequence[CaseRecord], seed: int = 0) -> list[str]:
    """Return the split of each case, in order.

    The manifest's split is used when it sets one; the manifest check makes sure it
    sets one in every row or in none. Otherwise each patient gets the hash split
    described in the module docstring.
    """
    if cases and all(case.split is not None for case in cases):
        return [str(case.split) for case in cases]

    positions = {case.patient_id: _split_position(case.patient_id, seed) for case in cases}
    split_of: dict[str, str] = {}
    for patient, position in positions.items():
        bound = 0.0
        split_of[patient] = SPLIT_FRACTIONS[-1][0]
        for name, fraction in SPLIT_FRACTIONS:
            bound += fraction
            if position < bound:
                split_of[patient] = name
                break
    if positions and "train" not in split_of.values():
        split_of[min(positions, key=lambda patient: positions[patient])] = "train"
    return [split_of[case.patient_id] for case in cases]


def _dataset_or_raise(site: SiteConfig, task: str) -> DatasetConfig:
    dataset = site.dataset_for(task)
    if dataset is None:
        served = ", ".join(d.task for d in site.datasets)
        raise DatasetError(
            f"{site.source}: site {site.site} has no dataset for task '{task}' (it serves: "
            f"{served}); add a dataset for it to the site YAML, or leave the site out of "
            "this stage",
            [],
        )
    return dataset


def split_counts(
    site: SiteConfig, task: str, seed: int = 0, num_classes: int | None = None
) -> dict[str, int]:
    """Count the cases of a task in each split, without decoding any image.

    Returns
    -------
    dict[str, int]
        ``{"train": n, "val": n, "test": n}``.

    Raises
    ------
    DatasetError
        When the site has no dataset for the task or its manifest has errors.
    """
    cases = read_cases(_dataset_or_raise(site, task), num_classes)
    counts = dict.fromkeys(SPLITS, 0)
    for split in assign_splits(cases, seed):
        counts[split] += 1
    return counts


# --------------------------------------------------------------------------- deterministic part


class NormalizeChannelsd(MapTransform):
    """Normalize each channel of an image by its modality (CT window, PET SUV scale).

    The image is ``(C, D, H, W)`` with channels named by ``channels``.
    """

    def __init__(
        self,
        keys: str,
        channels: Sequence[str],
        ct_window: tuple[float, float],
        suv_scale: float,
    ) -> None:
        super().__init__(keys)
        self.channels = tuple(channels)
        self.ct_window = ct_window
        self.suv_scale = suv_scale

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        result = dict(data)
        low, high = self.ct_window
        for key in self.key_iterator(result):
            image = result[key]
            normalized = []
            for index, channel in enumerate(self.channels):
                values = image[index]
                if channel == "ct":
                    values = ((values - low) / (high - low)).clamp(0.0, 1.0)
                else:
                    values = values.clamp(min=0.0) / self.suv_scale
                normalized.append(values)
            result[key] = torch.stack(normalized, dim=0)
        return result


def _plain(tensor: Any) -> torch.Tensor:
    """Return a MetaTensor's data as a plain tensor (default collate needs no metadata)."""
    if isinstance(tensor, MetaTensor):
        return tensor.as_tensor()
    return torch.as_tensor(tensor)


def preprocess_case(
    case: CaseRecord,
    dataset: DatasetConfig,
    preprocess: PreprocessConfig,
    num_classes: int,
) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Run the deterministic part on one case, without the cache.

    Returns
    -------
    tensors : dict[str, torch.Tensor]
        ``image`` float32 ``(C, D, H, W)``, RAS, at ``preprocess.spacing``, normalized;
        for segmentation also ``label`` int64 ``(1, D, H, W)`` task classes.
    affine : np.ndarray
        ``(4, 4)`` RAS affine of the output grid.

    Raises
    ------
    CaseDataError
        When a file of the case has an error (the message lists the first ones).
    """
    with_label = dataset.kind == "segmentation"
    loaded = load_case_volumes(
        case.images,
        case.label if with_label else None,
        dataset.modality,
        dataset.label_map,
        num_classes,
    )
    if not loaded.ok or loaded.image is None or loaded.affine is None:
        raise CaseDataError(
            f"case {case.case_id} of task '{dataset.task}' cannot be loaded; run "
            f"'unicon site check' for the full report:\n{describe_issues(loaded.issues)}"
        )

    affine = torch.as_tensor(loaded.affine, dtype=torch.float64)
    data: dict[str, Any] = {"image": MetaTensor(torch.from_numpy(loaded.image), affine=affine)}
    keys = ["image"]
    if with_label and loaded.label is not None:
        label = torch.from_numpy(loaded.label[np.newaxis].astype(np.float32))
        data["label"] = MetaTensor(label, affine=affine.clone())
        keys.append("label")

    transforms = Compose(
        [
            # labels=None takes the axis names from the MetaTensor's space, RAS here,
            # because nibabel affines map to RAS+ world coordinates.
            Orientationd(keys=keys, axcodes="RAS", labels=None),
            Spacingd(
                keys=keys,
                pixdim=preprocess.spacing,
                mode=("bilinear", "nearest")[: len(keys)],
                padding_mode=("border", "zeros")[: len(keys)],
                # float32 halves the memory of large CTs against MONAI's float64 default
                # and changes values by far less than the HU quantization.
                dtype=np.float32,
            ),
            NormalizeChannelsd(
                "image",
                MODALITY_CHANNELS[dataset.modality],
                preprocess.ct_window,
                preprocess.suv_scale,
            ),
        ]
    )
    output = transforms(data)
    image = output["image"]
    out_affine = np.asarray(image.affine, dtype=np.float64)
    tensors = {"image": _plain(image).to(torch.float32).contiguous()}
    if "label" in output:
        tensors["label"] = torch.round(_plain(output["label"])).to(torch.int64).contiguous()
    return tensors, out_affine


class CaseCache:
    """Preprocessed cases on disk: ``<key>.safetensors`` plus ``<key>.json``.

    Both files are written to a temporary name and renamed, and the JSON last, so a
    crash never leaves an entry that looks complete.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        """Return the tensors stored under ``key``, or None when there is no valid entry."""
        meta_path = self.folder / f"{key}.json"
        tensor_path = self.folder / f"{key}.safetensors"
        if not (meta_path.is_file() and tensor_path.is_file()):
            return None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if meta.get("key") != key:
                return None
            tensors = load_file(str(tensor_path))
        except (OSError, ValueError, SafetensorError) as error:
            logger.warning("ignored unreadable cache entry %s, recomputing it: %s", tensor_path, error)
            return None
        if "label" in tensors:
            tensors["label"] = tensors["label"].to(torch.int64)
        return tensors

    def store(self, key: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Write an entry atomically (temporary file, then ``os.replace``)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        stored = dict(tensors)
        if "label" in stored:
            # Task classes are small integers; int16 keeps the cache four times smaller.
            stored["label"] = stored["label"].to(torch.int16)
        tensor_path = self.folder / f"{key}.safetensors"
        meta_path = self.folder / f"{key}.json"
        suffix = f".tmp-{os.getpid()}"
        save_file(stored, str(tensor_path) + suffix, metadata={"key": key})
        os.replace(str(tensor_path) + suffix, tensor_path)
        text = json.dumps({**meta, "key": key}, indent=2, sort_keys=True)
        Path(str(meta_path) + suffix).write_text(text, encoding="utf-8")
        os.replace(str(meta_path) + suffix, meta_path)


def cache_key(
    case: CaseRecord, dataset: DatasetConfig, preprocess: PreprocessConfig, num_classes: int
) -> str:
    """Hash what the deterministic part depends on: files (path, size, mtime) and settings."""
    files = []
    for path in case.files() if dataset.kind == "segmentation" else case.images.values():
        stat = path.stat()
        files.append([str(path), stat.st_size, stat.st_mtime_ns])
    description = {
        "version": CACHE_VERSION,
        "files": files,
        "modality": dataset.modality,
        "segmentation": dataset.kind == "segmentation",
        "label_map": sorted(dataset.label_map.items()) if dataset.label_map else None,
        "num_classes": num_classes,
        "spacing": list(preprocess.spacing),
        "ct_window": list(preprocess.ct_window),
        "suv_scale": preprocess.suv_scale,
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]


# --------------------------------------------------------------------------- datasets


def fit_to_patch(image: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
    """Resize ``(C, D, H, W)`` keeping the aspect ratio to fit ``patch_size``, then pad."""
    shape = image.shape[1:]
    scale = min(p / s for p, s in zip(patch_size, shape, strict=True))
    fitted = tuple(max(1, min(p, round(s * scale))) for p, s in zip(patch_size, shape, strict=True))
    if tuple(shape) != fitted:
        # Area averaging when shrinking avoids aliasing without the zero-padded blur
        # that Gaussian anti-aliasing adds at the volume border.
        mode = "area" if scale < 1.0 else "trilinear"
        image = Resize(spatial_size=fitted, mode=mode)(image)
    return _plain(SpatialPad(spatial_size=patch_size)(image))


class TaskDataset(Dataset[dict[str, torch.Tensor]]):
    """Preprocessed cases of one task and split, as dictionaries of tensors.

    Items follow "One preprocessed case" of docs/design.md: ``image`` float32
    ``(C, D, H, W)``; ``label`` int64 ``(1, D, H, W)`` (segmentation); ``class`` int64
    ``()`` (classification); ``time`` and ``event`` float32 ``()`` (prognosis).

    NOTE: the random crops draw from one generator per dataset object. DataLoader
    workers each copy it and would repeat the same crops; use ``num_workers=0`` or
    reseed per worker (MONAI's ``DataLoader`` does this).
    """

    def __init__(
        self,
        cases: Sequence[CaseRecord],
        dataset: DatasetConfig,
        preprocess: PreprocessConfig,
        train: bool,
        num_classes: int,
        cache_dir: Path,
        seed: int = 0,
    ) -> None:
        self.cases = list(cases)
        self.dataset = dataset
        self.preprocess = preprocess
        self.train = train
        self.num_classes = num_classes
        self.cache = CaseCache(cache_dir)
        self.crop: RandCropByPosNegLabeld | None = None
        self.pad: Compose | None = None
        if dataset.kind == "segmentation":
            keys = ["image", "label"]
            if train:
                self.pad = Compose([SpatialPadd(keys=keys, spatial_size=preprocess.patch_size)])
                self.crop = RandCropByPosNegLabeld(
                    keys=keys,
                    label_key="label",
                    spatial_size=preprocess.patch_size,
                    pos=1.0,
                    neg=1.0,
                    num_samples=1,
                )
                self.crop.set_random_state(seed=seed)
            else:
                self.pad = Compose([DivisiblePadd(keys=keys, k=EVAL_DIVISOR)])

    def __len__(self) -> int:
        return len(self.cases)

    def load_deterministic(self, index: int) -> dict[str, torch.Tensor]:
        """Return the cached deterministic tensors of a case, computing them on a miss."""
        case = self.cases[index]
        key = cache_key(case, self.dataset, self.preprocess, self.num_classes)
        tensors = self.cache.load(key)
        if tensors is not None:
            return tensors
        tensors, affine = preprocess_case(case, self.dataset, self.preprocess, self.num_classes)
        meta = {
            "case_id": case.case_id,
            "task": self.dataset.task,
            "affine": affine.tolist(),
            "preprocess": asdict(self.preprocess),
        }
        self.cache.store(key, tensors, meta)
        logger.debug("cached case %s of task %s as %s", case.case_id, self.dataset.task, key)
        return tensors

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        case = self.cases[index]
        tensors = self.load_deterministic(index)
        kind = self.dataset.kind

        if kind == "segmentation":
            data: Any = {"image": tensors["image"], "label": tensors["label"]}
            if self.pad is not None:
                data = self.pad(data)
            if self.crop is not None:
                data = self.crop(data)[0]
            return {
                "image": _plain(data["image"]).to(torch.float32).contiguous(),
                "label": _plain(data["label"]).to(torch.int64).contiguous(),
            }

        item = {"image": fit_to_patch(tensors["image"], self.preprocess.patch_size).contiguous()}
        if kind == "classification":
            item["class"] = torch.tensor(case.class_label, dtype=torch.int64)
        else:
            item["time"] = torch.tensor(case.time, dtype=torch.float32)
            item["event"] = torch.tensor(case.event, dtype=torch.float32)
        return item


def load_task_dataset(
    site: SiteConfig,
    task: str,
    preprocess: PreprocessConfig,
    split: str,
    train: bool,
    num_classes: int,
    seed: int = 0,
) -> TaskDataset:
    """Return the preprocessed cases of one task and split of a site.

    Parameters
    ----------
    site : SiteConfig
        The site; the cache is in its ``state_dir/cache/<task>/``.
    task : str
        Curriculum task; the site must have a dataset for it.
    preprocess : PreprocessConfig
        Stage settings.
    split : str
        ``train``, ``val`` or ``test``.
    train : bool
        For segmentation, random crops of ``patch_size`` (True) or whole volumes padded
        to a multiple of 16 (False). No effect for other kinds.
    num_classes : int
        Number of task classes, background included.
    seed : int, optional
        Seed of the hash split (when the manifest sets none) and of the random crops.

    Returns
    -------
    TaskDataset
        Works with the default collate (segmentation evaluation needs batch size 1).

    Raises
    ------
    DatasetError
        When the site has no dataset for the task or its manifest has errors.
    CaseDataError
        On access, when a case's files have errors (``unicon site check`` finds them first).
    """
    if split not in SPLITS:
        raise ValueError(f"split is {split!r}; allowed values: {', '.join(SPLITS)}")
    dataset = _dataset_or_raise(site, task)
    cases = read_cases(dataset, num_classes)
    selected = [
        case for case, case_split in zip(cases, assign_splits(cases, seed), strict=True)
        if case_split == split
    ]
    logger.info(
        "site=%s task=%s split=%s: %d of %d cases", site.site, task, split, len(selected),
        len(cases),
    )
    return TaskDataset(
        selected, dataset, preprocess, train, num_classes, site.cache_dir / task, seed
    )
