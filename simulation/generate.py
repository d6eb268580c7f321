"""Generate virtual hospitals of synthetic CT and PET/CT studies for simulations.

A generated federation is one folder with a sub-folder per site::

    OUT/
      cohort.json                     generation parameters and per-site counts, no case values
      hospital-a/
        site.yaml                     site configuration (``state_dir: state``)
        data/ct_cls.csv, ...          one CSV manifest per task, paths relative to the manifest
        data/images/<case>_ct.nii.gz  CT in HU (int16)
        data/images/<case>_pet.nii.gz PET in SUV (float32), own grid and affine
        data/images/<case>_lesion.nii.gz  lesion mask on the CT grid (uint8, 0/1)

Phantom
-------
Each case is a small thoracic phantom defined in world coordinates (RAS+, mm). It has
an elliptic body with a fat layer (-100 HU) around soft tissue (40 HU), two lungs
(-850 HU), a heart (45 HU), a spine (700 HU cortex, 250 HU marrow) and a bladder-like
fluid blob (10 HU), in air (-1000 HU). Lesions are lobulated ellipsoids inside the
lungs. The CT, the PET and the mask are sampled from the same world-space phantom on
their own grids, so they agree physically whatever each file's orientation (RAS or LPS
voxel axes, drawn per file), spacing and origin. PET is sampled at twice its resolution,
averaged (partial volume), blurred to a 6.5 mm FWHM resolution and given noise. Hot
structures that are not lesions (heart 2.5-8 SUV, bladder 8-20 SUV, marrow 1.8 SUV)
make a plain SUV threshold a poor segmenter.

Labels
------
- ``ct_cls``: class 1 cases carry either a large lesion burden or a small but lobulated,
  heterogeneous lesion with a necrotic core. Class 0 cases carry no lesion (35 %) or
  small, smooth, homogeneous lesions. Volume ranges overlap, so shape and texture matter.
- ``ct_prog``: Weibull survival times (shape 2.5, ``T = E**0.4 / h`` with ``E`` a unit
  exponential draw) whose time scale ``1 / h`` follows the log-hazard
  ``log(1/3000 d) + 8 * V + 0.05 * S + 0.6 * H``, where ``V`` is the lesion burden
  (sum of cubed lesion radii relative to the lung half-width), ``S`` the mean lesion SUV
  and ``H`` 1 for heterogeneous lesions. The task reads CT only, so the CT-visible terms
  (burden, heterogeneity) dominate; with ``4 * V + 0.15 * S`` the SUV term, invisible on
  CT, outweighed the burden and the demo's test C-index stayed near 0.5. Independent
  exponential censoring is calibrated per site so that about 30 % of cases are
  censored. Times are whole days, at least 1.
- ``ct_seg`` and ``petct_seg``: lesion masks on the CT grid, classes 0 (background) and
  1 (lesion); lesion-free cases have empty masks.

Sites differ in size, class balance, CT spacing, PET spacing, HU offset and scale, CT
noise, PET noise and SUV calibration, and in the share of cases with PET. With two or
more sites the last site has no ``ct_prog`` dataset, so a federation can check that a
site without data for a stage is left out. Splits are explicit and per patient: the
same case has the same split in every manifest of its site.

Output is deterministic for a seed: NIfTI headers are set explicitly and the gzip
streams carry a fixed modification time, so repeated runs write the same bytes.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt
import yaml
from scipy import ndimage

from unicon_model.log import get_logger

logger = get_logger(__name__)

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

DEFAULT_SHAPE: tuple[int, int, int] = (40, 40, 32)
TINY_SHAPE: tuple[int, int, int] = (24, 24, 16)
DEFAULT_CASES_PER_SITE: tuple[int, int] = (12, 30)
TINY_CASES_PER_SITE: tuple[int, int] = (6, 8)
MIN_CASES_PER_SITE = 5
MIN_SHAPE = 16

# Field of view of the default shape is drawn per site from these spacings, so the
# anatomy keeps its physical size when a smaller shape (the tiny preset) is requested.
_IN_PLANE_SPACING_MM = (2.3, 2.8)
_SLICE_SPACING_CHOICES_MM = (3.0, 3.5, 4.0, 5.0)
_PET_SPACING_MM = (4.0, 5.0)
_PET_FWHM_MM = 6.5

SPLIT_CYCLE = ("train", "val", "train", "test", "train")
"""Splits handed out in turn over the cases of a site sorted by class (60/20/20)."""

TARGET_CENSORED_FRACTION = 0.3
SURVIVAL_WEIBULL_SHAPE = 2.5
LESION_FREE_SHARE_OF_NEGATIVES = 0.35

_COHORT_FILE = "cohort.json"
_GZIP_LEVEL = 6


class SiteBuildError(ValueError):
    """Virtual sites cannot be built from the given parameters or data folder."""


@dataclass(frozen=True)
class TaskSpec:
    """A curriculum task that a generated dataset serves."""

    name: str
    kind: str
    modality: str


DEFAULT_TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("ct_cls", "classification", "ct"),
    TaskSpec("ct_prog", "prognosis", "ct"),
    TaskSpec("ct_seg", "segmentation", "ct"),
    TaskSpec("petct_seg", "segmentation", "petct"),
)
_TASKS_BY_NAME = {task.name: task for task in DEFAULT_TASKS}

_MANIFEST_COLUMNS: dict[str, tuple[str, ...]] = {
    "ct_cls": ("case_id", "patient_id", "ct", "class", "split"),
    "ct_prog": ("case_id", "patient_id", "ct", "time", "event", "split"),
    "ct_seg": ("case_id", "patient_id", "ct", "label", "split"),
    "petct_seg": ("case_id", "patient_id", "ct", "pet", "label", "split"),
}


# ---------------------------------------------------------------------------
# Writers shared with simulation.real_sites
# ---------------------------------------------------------------------------


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` through a temporary file and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def write_nifti(
    path: Path,
    data: npt.NDArray[Any],
    affine: FloatArray,
    description: str = "unicon-fl synthetic",
) -> None:
    """Write a 3D array as a gzip-compressed NIfTI-1 file with reproducible bytes.

    Parameters
    ----------
    path : Path
        Target file, ending in ``.nii.gz``.
    data : numpy.ndarray
        Voxel array of shape ``(X, Y, Z)``, stored in its own dtype without scaling.
    affine : numpy.ndarray
        ``(4, 4)`` voxel-to-world (RAS+, mm) matrix, written as both qform and sform
        with code 1 (scanner coordinates).
    description : str
        Text for the header's ``descrip`` field (at most 80 bytes).
    """
    image = nib.Nifti1Image(np.asarray(data), affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header["descrip"] = description.encode("ascii")[:79]

    # A fixed gzip mtime and an empty stored file name keep the bytes identical across runs.
    buffer = io.BytesIO()
    with gzip.GzipFile(
        filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=_GZIP_LEVEL
    ) as stream:
        stream.write(image.to_bytes())
    atomic_write_bytes(path, buffer.getvalue())


def write_manifest(path: Path, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """Write a CSV manifest with the given column order (missing cells are left empty)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({column: row.get(column, "") for column in columns})
    atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))


class _FlowMapping(dict[Any, Any]):
    """A mapping written in YAML flow style, as in ``label_map: {1: [2, 3]}``."""


class _SiteYamlDumper(yaml.SafeDumper):
    """Safe YAML dumper that writes :class:`_FlowMapping` values on one line."""


def _represent_flow_mapping(dumper: yaml.SafeDumper, data: _FlowMapping) -> yaml.Node:
    return dumper.represent_mapping("tag:yaml.org,2002:map", data, flow_style=True)


_SiteYamlDumper.add_representer(_FlowMapping, _represent_flow_mapping)


def write_site_yaml(
    path: Path,
    site: str,
    state_dir: str,
    datasets: Sequence[Mapping[str, Any]],
    comment: str,
) -> None:
    """Write a site configuration in the site YAML format.

    Parameters
    ----------
    path : Path
        Target YAML file.
    site : str
        Site name (lower-case letters, digits and ``-``).
    state_dir : str
        State folder, relative to the YAML file.
    datasets : sequence of mapping
        One mapping per task with keys ``task``, ``kind``, ``modality``, ``format``,
        ``manifest`` and optionally ``label_map`` (``{task class: [source values]}``).
    comment : str
        One or more lines written as a ``#`` comment above the configuration.
    """
    entries = []
    for dataset in datasets:
        entry = dict(dataset)
        if entry.get("label_map") is not None:
            entry["label_map"] = _FlowMapping(entry["label_map"])
        entries.append(entry)
    document = {"site": site, "state_dir": state_dir, "datasets": entries}
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    body = yaml.dump(document, Dumper=_SiteYamlDumper, sort_keys=False, default_flow_style=False)
    atomic_write_bytes(path, (header + body).encode("utf-8"))


def write_json(path: Path, document: Mapping[str, Any]) -> None:
    """Write a JSON document (indented, keys in insertion order) atomically."""
    atomic_write_bytes(path, (json.dumps(document, indent=2) + "\n").encode("utf-8"))


def site_name(index: int) -> str:
    """Return the name of the site at ``index``: hospital-a, ..., hospital-z, hospital-aa, ..."""
    letters = ""
    number = index + 1
    while number > 0:
        number, remainder = divmod(number - 1, 26)
        letters = chr(ord("a") + remainder) + letters
    return f"hospital-{letters}"


def prepare_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Create ``out_dir`` or clear what an earlier generation wrote there.

    An existing folder is accepted when it is empty, or when it contains a ``cohort.json``
    from an earlier run and ``overwrite`` is true. Only the paths listed in that
    ``cohort.json`` under ``written_paths`` are removed, so site ``state/`` folders and
    any other files survive.

    Raises
    ------
    SiteBuildError
        When the folder contains other files, or an earlier cohort and ``overwrite`` is
        false.
    """
    if not out_dir.exists():
        out_dir.mkdir(parents=True)
        return
    if not out_dir.is_dir():
        raise SiteBuildError(f"Output path {out_dir} is a file; pass a folder as out_dir.")
    if not any(out_dir.iterdir()):
        return

    cohort_path = out_dir / _COHORT_FILE
    if not cohort_path.is_file():
        raise SiteBuildError(
            f"Output folder {out_dir} is not empty and contains no {_COHORT_FILE} from an earlier "
            "generation; pass a new or empty folder as out_dir."
        )
    if not overwrite:
        raise SiteBuildError(
            f"Output folder {out_dir} already contains generated sites ({cohort_path}); choose "
            "another output folder (unicon simulate --out, or a new out_dir) or remove this one."
        )

    try:
        previous = json.loads(cohort_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise SiteBuildError(
            f"Cannot read {cohort_path} to find the files of the earlier generation ({error}); "
            "delete the folder by hand or choose another out_dir."
        ) from error
    root = out_dir.resolve()
    for relative in previous.get("written_paths", []):
        target = (out_dir / relative).resolve()
        if root not in target.parents:
            logger.warning("prepare output: skipping %s, which lies outside %s", target, root)
            continue
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    cohort_path.unlink()
    logger.info("prepare output: removed the earlier generation in %s", out_dir)


# ---------------------------------------------------------------------------
# Grids and phantoms
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """A voxel grid: array shape and voxel-to-world (RAS+, mm) affine."""

    shape: tuple[int, int, int]
    affine: FloatArray

    @staticmethod
    def centred(
        shape: Sequence[int], spacing: Sequence[float], centre: FloatArray, lps: bool
    ) -> Grid:
        """Build an axis-aligned grid whose centre lies at ``centre`` (world mm).

        With ``lps`` the first two voxel axes run towards left and posterior (negative
        world x and y), as in DICOM-derived files. Without it they run towards right and
        anterior.
        """
        signs = np.array([-1.0, -1.0, 1.0]) if lps else np.ones(3)
        linear = np.diag(signs * np.asarray(spacing, dtype=float))
        middle = (np.asarray(shape, dtype=float) - 1.0) / 2.0
        affine = np.eye(4)
        affine[:3, :3] = linear
        affine[:3, 3] = centre - linear @ middle
        return Grid((int(shape[0]), int(shape[1]), int(shape[2])), affine)

    def world(self, oversample: int = 1) -> FloatArray:
        """Return world coordinates of voxel centres, shape ``(3, X*o, Y*o, Z*o)``.

        With ``oversample`` o > 1 each voxel is split into o^3 sub-voxels whose centres
        are returned instead, for partial-volume averaging with :func:`block_mean`.
        """
        axes = [(np.arange(n * oversample) + 0.5) / oversample - 0.5 for n in self.shape]
        index = np.stack(np.meshgrid(*axes, indexing="ij"))
        world = np.tensordot(self.affine[:3, :3], index, axes=1)
        return world + self.affine[:3, 3, None, None, None]


def block_mean(values: FloatArray, factor: int) -> FloatArray:
    """Average non-overlapping ``factor``^3 blocks: ``(X*f, Y*f, Z*f)`` -> ``(X, Y, Z)``."""
    x, y, z = (n // factor for n in values.shape)
    blocks = values.reshape(x, factor, y, factor, z, factor)
    return blocks.mean(axis=(1, 3, 5))


# Tissue codes of the phantom and their CT numbers (HU) before scanner effects.
AIR, FAT, SOFT_TISSUE, LUNG, BONE, MARROW, HEART, BLADDER = range(8)
TISSUE_HU = np.array([-1000.0, -100.0, 40.0, -850.0, 700.0, 250.0, 45.0, 10.0])
NECROSIS_HU = 5.0
NECROSIS_SUV = 0.8

# Anatomy in body coordinates: offsets are fractions of the field-of-view half-extent,
# scaled by the case's body size. z offsets are not scaled because the body fills all slices.
_LUNG_CENTRE_U, _LUNG_CENTRE_V, _LUNG_CENTRE_W = 0.4, 0.05, 0.1
_LUNG_SEMI_AXES = (0.3, 0.45, 0.75)
_HEART_CENTRE = (-0.05, 0.25, -0.3)
_HEART_SEMI_AXES = (0.17, 0.2, 0.25)
_BLADDER_CENTRE = (0.0, 0.1, -0.85)
_BLADDER_SEMI_AXES = (0.2, 0.2, 0.12)
_BODY_SEMI_AXES = (0.85, 0.65)
_SPINE_CENTRE_V = -0.42
_SPINE_RADIUS = 0.11


@dataclass(frozen=True)
class Lesion:
    """One lobulated ellipsoid lesion in world coordinates (mm)."""

    centre: FloatArray
    semi_axes: FloatArray
    relative_radius: float
    irregularity: float
    lobe_axes: FloatArray
    lobe_frequencies: tuple[int, ...]
    lobe_phases: tuple[float, ...]
    lobe_weights: tuple[float, ...]
    heterogeneous: bool
    hu: float
    suv: float

    def regions(self, world: FloatArray) -> tuple[BoolArray, BoolArray]:
        """Return (inside, necrotic core) masks at world points of shape ``(3, ...)``.

        The surface radius varies with direction as ``1 + irregularity * bumps`` where
        ``bumps`` sums cosines of the angle to a few random axes, which gives lobulated
        outlines for high irregularity and near-ellipsoids for low irregularity.
        """
        inside = np.zeros(world.shape[1:], dtype=bool)
        core = np.zeros(world.shape[1:], dtype=bool)

        # The surface never reaches beyond (1 + irregularity) semi-axes, so only points in
        # that box are evaluated.
        reach = self.semi_axes * (1.0 + self.irregularity)
        offset_all = world - self.centre[:, None, None, None]
        candidates = np.all(np.abs(offset_all) <= reach[:, None, None, None], axis=0)
        if not candidates.any():
            return inside, core
        offset = offset_all[:, candidates]

        radius = np.sqrt(np.sum((offset / self.semi_axes[:, None]) ** 2, axis=0))
        distance = np.maximum(np.sqrt(np.sum(offset**2, axis=0)), 1e-6)
        direction = offset / distance
        bumps = np.zeros_like(radius)
        for axis, frequency, phase, weight in zip(
            self.lobe_axes, self.lobe_frequencies, self.lobe_phases, self.lobe_weights, strict=True
        ):
            cosine = np.clip(axis @ direction, -1.0, 1.0)
            bumps += weight * np.cos(frequency * np.arccos(cosine) + phase)
        surface = 1.0 + self.irregularity * bumps

        inside[candidates] = radius <= surface
        if self.heterogeneous:
            core[candidates] = radius <= 0.45 * surface
        return inside, core


@dataclass(frozen=True)
class Phantom:
    """One synthetic patient: anatomy, lesions and PET uptake, in world mm."""

    body_centre: FloatArray
    half_extent: FloatArray
    body_scale: float
    fat_thickness: float
    lung_scale: float
    tissue_suv: float
    heart_suv: float
    bladder_suv: float
    lesions: tuple[Lesion, ...]
    class_label: int

    @property
    def lesion_burden(self) -> float:
        """Sum of cubed lesion radii relative to the lung half-width (unit-free volume)."""
        return float(sum(lesion.relative_radius**3 for lesion in self.lesions))

    @property
    def mean_lesion_suv(self) -> float:
        """Volume-weighted mean lesion SUV before blur and noise; 0 without lesions."""
        if not self.lesions:
            return 0.0
        weights = np.array([lesion.relative_radius**3 for lesion in self.lesions])
        values = np.array([lesion.suv for lesion in self.lesions])
        return float(np.sum(weights * values) / np.sum(weights))

    def log_hazard(self) -> float:
        """Return the log of the hazard ``h`` per day that sets the survival time scale ``1 / h``."""
        heterogeneous = any(lesion.heterogeneous for lesion in self.lesions)
        return (
            math.log(1.0 / 3000.0)
            + 8.0 * self.lesion_burden
            + 0.05 * self.mean_lesion_suv
            + 0.6 * float(heterogeneous)
        )

    def tissues(self, world: FloatArray) -> npt.NDArray[np.int8]:
        """Return the tissue code at world points ``(3, ...)``; later structures overwrite."""
        scale = self.body_scale
        centre = self.body_centre[:, None, None, None]
        half_extent = self.half_extent[:, None, None, None]
        u, v, w = (world - centre) / half_extent
        tissue = np.full(u.shape, AIR, dtype=np.int8)

        body_u, body_v = _BODY_SEMI_AXES[0] * scale, _BODY_SEMI_AXES[1] * scale
        tissue[(u / body_u) ** 2 + (v / body_v) ** 2 <= 1.0] = FAT
        inner_u, inner_v = body_u - self.fat_thickness, body_v - self.fat_thickness
        tissue[(u / inner_u) ** 2 + (v / inner_v) ** 2 <= 1.0] = SOFT_TISSUE

        lung_axes = [a * scale * self.lung_scale for a in _LUNG_SEMI_AXES[:2]]
        lung_axes.append(_LUNG_SEMI_AXES[2] * self.lung_scale)
        for side in (-1.0, 1.0):
            lung_centre = (side * _LUNG_CENTRE_U * scale, _LUNG_CENTRE_V * scale, _LUNG_CENTRE_W)
            tissue[_ellipsoid(u, v, w, lung_centre, lung_axes)] = LUNG

        heart_centre = (_HEART_CENTRE[0] * scale, _HEART_CENTRE[1] * scale, _HEART_CENTRE[2])
        heart_axes = (_HEART_SEMI_AXES[0] * scale, _HEART_SEMI_AXES[1] * scale, _HEART_SEMI_AXES[2])
        tissue[_ellipsoid(u, v, w, heart_centre, heart_axes)] = HEART

        bladder_centre = (_BLADDER_CENTRE[0], _BLADDER_CENTRE[1] * scale, _BLADDER_CENTRE[2])
        bladder_axes = (
            _BLADDER_SEMI_AXES[0] * scale,
            _BLADDER_SEMI_AXES[1] * scale,
            _BLADDER_SEMI_AXES[2],
        )
        tissue[_ellipsoid(u, v, w, bladder_centre, bladder_axes)] = BLADDER

        # The spine is a round cylinder in mm, so its radius uses the smaller half-extent.
        radius_mm = _SPINE_RADIUS * scale * float(np.min(self.half_extent[:2]))
        x_mm = u * self.half_extent[0]
        y_mm = (v - _SPINE_CENTRE_V * scale) * self.half_extent[1]
        spine_distance = np.sqrt(x_mm**2 + y_mm**2)
        tissue[spine_distance <= radius_mm] = BONE
        tissue[spine_distance <= 0.6 * radius_mm] = MARROW
        return tissue

    def lesion_regions(
        self, world: FloatArray, tissue: npt.NDArray[np.int8]
    ) -> list[tuple[Lesion, BoolArray, BoolArray]]:
        """Return each lesion with its (inside, core) masks, clipped to the lungs."""
        lung = tissue == LUNG
        regions = []
        for lesion in self.lesions:
            inside, core = lesion.regions(world)
            regions.append((lesion, inside & lung, core & lung))
        return regions


def _ellipsoid(
    u: FloatArray,
    v: FloatArray,
    w: FloatArray,
    centre: Sequence[float],
    semi_axes: Sequence[float],
) -> BoolArray:
    return (
        ((u - centre[0]) / semi_axes[0]) ** 2
        + ((v - centre[1]) / semi_axes[1]) ** 2
        + ((w - centre[2]) / semi_axes[2]) ** 2
    ) <= 1.0


def smooth_noise(rng: np.random.Generator, shape: Sequence[int], sigma: float) -> FloatArray:
    """Return Gaussian-smoothed white noise rescaled to unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(tuple(shape)), sigma, mode="wrap")
    spread = float(field.std())
    return field / spread if spread > 0 else field


# ---------------------------------------------------------------------------
# Drawing sites and cases
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteProfile:
    """Scanner and population settings of one generated site."""

    name: str
    index: int
    num_cases: int
    positive_fraction: float
    field_of_view_mm: tuple[float, float, float]
    ct_spacing_mm: tuple[float, float, float]
    pet_spacing_mm: tuple[float, float, float]
    hu_offset: float
    hu_scale: float
    ct_noise_hu: float
    pet_noise: float
    suv_calibration: float
    pet_fraction: float
    tasks: tuple[str, ...]


@dataclass(frozen=True)
class CaseDraw:
    """Everything drawn for one case before rendering."""

    case_id: str
    patient_id: str
    phantom: Phantom
    ct_grid: Grid
    pet_grid: Grid
    ct_lps: bool
    pet_lps: bool
    render_seed: tuple[int, ...]


def _draw_site_profiles(
    num_sites: int,
    seed: int,
    shape: tuple[int, int, int],
    cases_per_site: tuple[int, int],
    tasks: tuple[str, ...],
) -> list[SiteProfile]:
    # Positive fractions are spread evenly and then shuffled, so class balance always
    # differs between sites while no site is tied to a fixed balance.
    order_rng = np.random.default_rng([seed, 0])
    fractions = np.linspace(0.2, 0.7, num_sites) if num_sites > 1 else np.array([0.45])
    fractions = fractions[order_rng.permutation(num_sites)]

    profiles = []
    for index in range(num_sites):
        rng = np.random.default_rng([seed, 1, index])
        in_plane = round(float(rng.uniform(*_IN_PLANE_SPACING_MM)), 2)
        slice_spacing = float(rng.choice(_SLICE_SPACING_CHOICES_MM))
        field_of_view = (
            DEFAULT_SHAPE[0] * in_plane,
            DEFAULT_SHAPE[1] * in_plane,
            DEFAULT_SHAPE[2] * slice_spacing,
        )
        ct_spacing = tuple(round(f / n, 4) for f, n in zip(field_of_view, shape, strict=True))
        pet_spacing = round(float(rng.uniform(*_PET_SPACING_MM)), 1)

        site_tasks = tasks
        if num_sites > 1 and index == num_sites - 1:
            site_tasks = tuple(task for task in tasks if task != "ct_prog")

        profiles.append(
            SiteProfile(
                name=site_name(index),
                index=index,
                num_cases=int(rng.integers(cases_per_site[0], cases_per_site[1] + 1)),
                positive_fraction=float(fractions[index]),
                field_of_view_mm=field_of_view,
                ct_spacing_mm=(ct_spacing[0], ct_spacing[1], ct_spacing[2]),
                pet_spacing_mm=(pet_spacing, pet_spacing, pet_spacing),
                hu_offset=round(float(rng.uniform(-20.0, 20.0)), 1),
                hu_scale=round(float(rng.uniform(0.97, 1.03)), 3),
                ct_noise_hu=round(float(rng.uniform(8.0, 30.0)), 1),
                pet_noise=round(float(rng.uniform(0.05, 0.15)), 3),
                suv_calibration=round(float(rng.uniform(0.9, 1.1)), 3),
                pet_fraction=round(float(rng.uniform(0.6, 1.0)), 2),
                tasks=site_tasks,
            )
        )
    return profiles


def _draw_lesion(
    rng: np.random.Generator,
    phantom_frame: Mapping[str, Any],
    relative_radius: float,
    irregularity: float,
    heterogeneous: bool,
    suv: float,
) -> Lesion:
    scale = phantom_frame["body_scale"] * phantom_frame["lung_scale"]
    half = phantom_frame["half_extent"]
    lung_semi_mm = np.array(
        [
            _LUNG_SEMI_AXES[0] * scale * half[0],
            _LUNG_SEMI_AXES[1] * scale * half[1],
            _LUNG_SEMI_AXES[2] * phantom_frame["lung_scale"] * half[2],
        ]
    )
    side = rng.choice([-1.0, 1.0])
    lung_centre_mm = phantom_frame["body_centre"] + np.array(
        [
            side * _LUNG_CENTRE_U * phantom_frame["body_scale"] * half[0],
            _LUNG_CENTRE_V * phantom_frame["body_scale"] * half[1],
            _LUNG_CENTRE_W * half[2],
        ]
    )

    # Centres lie in the inner half of the lung, so most of each lesion is lung tissue.
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    depth = 0.5 * rng.uniform() ** (1.0 / 3.0)
    centre = lung_centre_mm + depth * direction * lung_semi_mm

    radius_mm = relative_radius * lung_semi_mm[0]
    semi_axes = radius_mm * (1.0 + rng.uniform(-0.15, 0.15, 3))
    lobe_axes = rng.standard_normal((3, 3))
    lobe_axes /= np.linalg.norm(lobe_axes, axis=1, keepdims=True)
    weights = rng.uniform(0.5, 1.0, 3)
    weights /= weights.sum()
    return Lesion(
        centre=centre,
        semi_axes=semi_axes,
        relative_radius=relative_radius,
        irregularity=irregularity,
        lobe_axes=lobe_axes,
        lobe_frequencies=tuple(int(f) for f in rng.integers(2, 6, 3)),
        lobe_phases=tuple(float(p) for p in rng.uniform(0.0, 2.0 * math.pi, 3)),
        lobe_weights=tuple(float(w) for w in weights),
        heterogeneous=heterogeneous,
        hu=float(rng.uniform(25.0, 50.0)),
        suv=suv,
    )


def _draw_phantom(
    rng: np.random.Generator, class_label: int, centre: FloatArray, half_extent: FloatArray
) -> Phantom:
    frame: dict[str, Any] = {
        "body_scale": float(rng.uniform(0.82, 1.0)),
        "lung_scale": float(rng.uniform(0.88, 1.08)),
        "half_extent": half_extent,
        "body_centre": centre + rng.uniform(-0.04, 0.04, 3) * half_extent,
    }

    # Class 0: no lesion or small smooth ones. Class 1: a large burden, or a small but
    # lobulated lesion with a necrotic core. Burdens overlap between the classes.
    lesions: list[Lesion] = []
    if class_label == 0:
        if rng.uniform() >= LESION_FREE_SHARE_OF_NEGATIVES:
            for _ in range(int(rng.integers(1, 3))):
                lesions.append(
                    _draw_lesion(
                        rng,
                        frame,
                        relative_radius=float(rng.uniform(0.3, 0.45)),
                        irregularity=float(rng.uniform(0.0, 0.1)),
                        heterogeneous=False,
                        suv=float(rng.uniform(3.0, 7.0)),
                    )
                )
    elif rng.uniform() < 0.55:
        count = int(rng.integers(1, 4))
        heterogeneous = bool(rng.uniform() < 0.4)
        for index in range(count):
            radius = rng.uniform(0.5, 0.72) if index == 0 else rng.uniform(0.3, 0.45)
            lesions.append(
                _draw_lesion(
                    rng,
                    frame,
                    relative_radius=float(radius),
                    irregularity=float(rng.uniform(0.0, 0.3)),
                    heterogeneous=heterogeneous,
                    suv=float(rng.uniform(5.0, 12.0)),
                )
            )
    else:
        for _ in range(int(rng.integers(1, 3))):
            lesions.append(
                _draw_lesion(
                    rng,
                    frame,
                    relative_radius=float(rng.uniform(0.38, 0.52)),
                    irregularity=float(rng.uniform(0.25, 0.4)),
                    heterogeneous=True,
                    suv=float(rng.uniform(6.0, 12.0)),
                )
            )

    return Phantom(
        body_centre=frame["body_centre"],
        half_extent=half_extent,
        body_scale=frame["body_scale"],
        fat_thickness=float(rng.uniform(0.03, 0.1)),
        lung_scale=frame["lung_scale"],
        tissue_suv=float(rng.uniform(0.8, 1.3)),
        heart_suv=float(rng.uniform(2.5, 8.0)),
        bladder_suv=float(rng.uniform(8.0, 20.0)),
        lesions=tuple(lesions),
        class_label=class_label,
    )


def _draw_cases(
    profile: SiteProfile, seed: int, shape: tuple[int, int, int]
) -> tuple[list[CaseDraw], list[int]]:
    site_rng = np.random.default_rng([seed, 2, profile.index])
    num_positive = round(profile.positive_fraction * profile.num_cases)
    num_positive = min(max(num_positive, 1), profile.num_cases - 1)
    labels = [1] * num_positive + [0] * (profile.num_cases - num_positive)
    labels = [labels[i] for i in site_rng.permutation(profile.num_cases)]

    half_extent = np.asarray(profile.field_of_view_mm) / 2.0
    cases = []
    for index, class_label in enumerate(labels):
        rng = np.random.default_rng([seed, 3, profile.index, index])
        # Table positions differ per case, so world origins differ between files.
        centre = np.array(
            [rng.uniform(-5.0, 5.0), rng.uniform(-30.0, -10.0), rng.uniform(-400.0, -100.0)]
        )
        phantom = _draw_phantom(rng, class_label, centre, half_extent)
        ct_lps = bool(rng.uniform() < 0.5)
        pet_lps = bool(rng.uniform() < 0.5)
        pet_spacing = profile.pet_spacing_mm
        pet_shape = [
            math.ceil(extent / spacing) + 1
            for extent, spacing in zip(profile.field_of_view_mm, pet_spacing, strict=True)
        ]
        pet_centre = centre + rng.uniform(-0.5, 0.5, 3) * np.asarray(pet_spacing)
        cases.append(
            CaseDraw(
                case_id=f"{profile.name}-{index + 1:03d}",
                patient_id=f"{profile.name}-patient-{index + 1:03d}",
                phantom=phantom,
                ct_grid=Grid.centred(shape, profile.ct_spacing_mm, centre, ct_lps),
                pet_grid=Grid.centred(pet_shape, pet_spacing, pet_centre, pet_lps),
                ct_lps=ct_lps,
                pet_lps=pet_lps,
                render_seed=(seed, 4, profile.index, index),
            )
        )
    return cases, labels


def _assign_splits(labels: Sequence[int], rng: np.random.Generator) -> list[str]:
    # Sorting by class before handing out the split cycle stratifies the splits by class.
    keys = rng.permutation(len(labels))
    order = sorted(range(len(labels)), key=lambda i: (labels[i], keys[i]))
    splits = [""] * len(labels)
    for position, case_index in enumerate(order):
        splits[case_index] = SPLIT_CYCLE[position % len(SPLIT_CYCLE)]
    return splits


def _choose_pet_cases(splits: Sequence[str], fraction: float, rng: np.random.Generator) -> set[int]:
    chosen: set[int] = set()
    for split in ("train", "val", "test"):
        members = [i for i, s in enumerate(splits) if s == split]
        count = min(len(members), max(1, math.ceil(fraction * len(members))))
        chosen.update(int(i) for i in rng.choice(members, size=count, replace=False))
    return chosen


def _draw_survival(
    cases: Sequence[CaseDraw], rng: np.random.Generator
) -> tuple[list[int], list[int]]:
    hazards = np.exp([case.phantom.log_hazard() for case in cases])
    # Weibull event times, T = E**(1 / k) / h with E ~ Exp(1): the hazard sets the time
    # scale and the shape k > 1 narrows the spread around it, so that ranks follow the
    # lesions more closely than exponential times (k = 1) would.
    event_times = rng.exponential(1.0, len(cases)) ** (1.0 / SURVIVAL_WEIBULL_SHAPE) / hazards
    # Exponential censoring times U / c with U ~ Exp(1), drawn once. The censored share
    # grows with the rate c, so bisection on log c makes it the target.
    unit_censoring = rng.exponential(1.0, len(cases))
    low, high = -math.log(event_times.max()) - 10.0, -math.log(event_times.min()) + 10.0
    for _ in range(60):
        middle = (low + high) / 2.0
        if np.mean(unit_censoring / math.exp(middle) < event_times) > TARGET_CENSORED_FRACTION:
            high = middle
        else:
            low = middle
    censoring_times = unit_censoring / math.exp((low + high) / 2.0)
    times = [max(1, math.ceil(t)) for t in np.minimum(event_times, censoring_times)]
    events = [int(e <= c) for e, c in zip(event_times, censoring_times, strict=True)]
    return times, events


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


def render_ct(
    case: CaseDraw, profile: SiteProfile, rng: np.random.Generator
) -> tuple[npt.NDArray[np.int16], npt.NDArray[np.uint8]]:
    """Render the CT (HU) and the lesion mask of a case on its CT grid.

    Returns
    -------
    tuple of numpy.ndarray
        The CT of shape ``(X, Y, Z)`` in int16 HU clipped to [-1024, 3071], with the
        site's HU scale, HU offset and Gaussian noise. The lesion mask of the same shape,
        uint8 0/1.
    """
    world = case.ct_grid.world()
    tissue = case.phantom.tissues(world)
    hu = TISSUE_HU[tissue]

    anatomy_texture = smooth_noise(rng, tissue.shape, sigma=1.5)
    hu = hu + np.where(tissue == LUNG, 25.0, 0.0) * anatomy_texture
    hu = hu + np.where((tissue == SOFT_TISSUE) | (tissue == HEART), 8.0, 0.0) * anatomy_texture

    lesion_texture = smooth_noise(rng, tissue.shape, sigma=1.0)
    mask = np.zeros(tissue.shape, dtype=bool)
    for lesion, inside, core in case.phantom.lesion_regions(world, tissue):
        amplitude = 40.0 if lesion.heterogeneous else 8.0
        hu[inside] = lesion.hu + amplitude * lesion_texture[inside]
        hu[core] = NECROSIS_HU + 10.0 * lesion_texture[core]
        mask |= inside

    hu = profile.hu_scale * hu + profile.hu_offset
    hu = hu + rng.normal(0.0, profile.ct_noise_hu, hu.shape)
    ct = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    return ct, mask.astype(np.uint8)


def render_pet(case: CaseDraw, profile: SiteProfile, rng: np.random.Generator) -> FloatArray:
    """Render the PET (SUV) of a case on its own grid.

    Returns
    -------
    numpy.ndarray
        float32 SUV of the PET grid's shape ``(X, Y, Z)``: 2x oversampled tissue uptake
        averaged per voxel, blurred to the scanner resolution, with multiplicative and
        additive noise, clipped at 0 and scaled by the site's SUV calibration.
    """
    phantom = case.phantom
    oversample = 2
    world = case.pet_grid.world(oversample=oversample)
    tissue = phantom.tissues(world)
    uptake = np.array(
        [0.0, 0.3, phantom.tissue_suv, 0.45, 0.7, 1.8, phantom.heart_suv, phantom.bladder_suv]
    )
    suv = uptake[tissue]

    texture = smooth_noise(rng, tissue.shape, sigma=2.0)
    for lesion, inside, core in phantom.lesion_regions(world, tissue):
        spread = 0.3 if lesion.heterogeneous else 0.08
        suv[inside] = lesion.suv * np.clip(1.0 + spread * texture[inside], 0.2, None)
        suv[core] = NECROSIS_SUV

    suv = block_mean(suv, oversample)
    spacing = np.abs(np.diag(case.pet_grid.affine)[:3])
    suv = ndimage.gaussian_filter(suv, _PET_FWHM_MM / 2.3548 / spacing, mode="nearest")
    suv = suv * (1.0 + profile.pet_noise * rng.standard_normal(suv.shape))
    suv = suv + 0.03 * rng.standard_normal(suv.shape)
    suv = np.clip(suv, 0.0, None) * profile.suv_calibration
    return suv.astype(np.float32)


# ---------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------


def _check_parameters(
    num_sites: int,
    seed: int,
    cases_per_site: int | tuple[int, int],
    shape: Sequence[int],
    tasks: Sequence[str],
) -> tuple[tuple[int, int], tuple[int, int, int], tuple[str, ...]]:
    if isinstance(num_sites, bool) or not isinstance(num_sites, int) or num_sites < 1:
        raise SiteBuildError(f"num_sites must be an integer >= 1, got {num_sites!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SiteBuildError(f"seed must be a non-negative integer, got {seed!r}.")

    if isinstance(cases_per_site, int) and not isinstance(cases_per_site, bool):
        bounds = (cases_per_site, cases_per_site)
    elif isinstance(cases_per_site, tuple | list) and len(cases_per_site) == 2:
        bounds = (int(cases_per_site[0]), int(cases_per_site[1]))
    else:
        raise SiteBuildError(
            f"cases_per_site must be an integer or a (min, max) pair, got {cases_per_site!r}."
        )
    if bounds[0] < MIN_CASES_PER_SITE or bounds[1] < bounds[0]:
        raise SiteBuildError(
            f"cases_per_site={cases_per_site!r} is invalid: every site needs at least "
            f"{MIN_CASES_PER_SITE} cases so that train, val and test each get one, and min "
            "must not exceed max."
        )

    if len(shape) != 3 or any(int(n) < MIN_SHAPE for n in shape):
        raise SiteBuildError(
            f"shape must be three voxel counts of at least {MIN_SHAPE}, got {tuple(shape)!r}."
        )
    grid_shape = (int(shape[0]), int(shape[1]), int(shape[2]))

    unknown = [task for task in tasks if task not in _TASKS_BY_NAME]
    if unknown or not tasks or len(set(tasks)) != len(tasks):
        raise SiteBuildError(
            f"tasks={list(tasks)!r} is invalid: give distinct task names from "
            f"{sorted(_TASKS_BY_NAME)}."
        )
    ordered = tuple(task.name for task in DEFAULT_TASKS if task.name in tasks)
    return bounds, grid_shape, ordered


def generate_federation(
    out_dir: Path,
    num_sites: int = 4,
    seed: int = 0,
    cases_per_site: int | tuple[int, int] | None = None,
    shape: Sequence[int] | None = None,
    tasks: Sequence[str] | None = None,
    tiny: bool = False,
    overwrite: bool = False,
) -> list[Path]:
    """Generate a federation of virtual hospitals with synthetic CT and PET/CT studies.

    Parameters
    ----------
    out_dir : Path
        Folder to write into. It must be new, empty, or hold an earlier generation
        (then ``overwrite`` must be true).
    num_sites : int
        Number of sites, named ``hospital-a``, ``hospital-b``, ...
    seed : int
        Seed of every random draw; the same seed and parameters give the same bytes.
    cases_per_site : int or (int, int), optional
        Cases per site, or inclusive bounds from which each site draws its size.
        Default (12, 30), or (6, 8) with ``tiny``. At least 5.
    shape : sequence of 3 int, optional
        CT grid ``(X, Y, Z)`` in voxels. Default (40, 40, 32), or (24, 24, 16) with
        ``tiny``. Each site's field of view in mm does not depend on it, so a smaller
        shape gives coarser voxels of the same anatomy.
    tasks : sequence of str, optional
        Tasks to write manifests for, from ``ct_cls``, ``ct_prog``, ``ct_seg`` and
        ``petct_seg`` (default: all four). With two or more sites the last one never
        gets ``ct_prog``.
    tiny : bool
        Use the small defaults meant for continuous integration.
    overwrite : bool
        Replace an earlier generation in ``out_dir`` (its listed files only).

    Returns
    -------
    list of Path
        The site YAML files, one per site, in site order.

    Raises
    ------
    SiteBuildError
        When a parameter is invalid or ``out_dir`` cannot be used.
    """
    default_cases = TINY_CASES_PER_SITE if tiny else DEFAULT_CASES_PER_SITE
    default_shape = TINY_SHAPE if tiny else DEFAULT_SHAPE
    bounds, grid_shape, task_names = _check_parameters(
        num_sites,
        seed,
        default_cases if cases_per_site is None else cases_per_site,
        default_shape if shape is None else shape,
        [task.name for task in DEFAULT_TASKS] if tasks is None else list(tasks),
    )
    out_dir = Path(out_dir)
    prepare_output_dir(out_dir, overwrite)

    profiles = _draw_site_profiles(num_sites, seed, grid_shape, bounds, task_names)
    yaml_paths: list[Path] = []
    site_summaries: list[dict[str, Any]] = []
    written_paths: list[str] = []
    for profile in profiles:
        yaml_path, summary = _write_site(out_dir, profile, seed, grid_shape)
        yaml_paths.append(yaml_path)
        site_summaries.append(summary)
        written_paths += [f"{profile.name}/data", f"{profile.name}/site.yaml"]
        logger.info(
            "generate: wrote %s with %d cases (%s)",
            profile.name,
            profile.num_cases,
            ", ".join(profile.tasks),
        )

    cohort = {
        "generator": "simulation.generate",
        "format_version": 1,
        "seed": seed,
        "num_sites": num_sites,
        "shape": list(grid_shape),
        "cases_per_site": list(bounds),
        "tiny": tiny,
        "tasks": {
            name: {"kind": _TASKS_BY_NAME[name].kind, "modality": _TASKS_BY_NAME[name].modality}
            for name in task_names
        },
        "split_cycle": list(SPLIT_CYCLE),
        "target_censored_fraction": TARGET_CENSORED_FRACTION,
        "pet_fwhm_mm": _PET_FWHM_MM,
        "sites": site_summaries,
        "written_paths": written_paths,
    }
    write_json(out_dir / _COHORT_FILE, cohort)
    return yaml_paths


def _write_site(
    out_dir: Path, profile: SiteProfile, seed: int, shape: tuple[int, int, int]
) -> tuple[Path, dict[str, Any]]:
    site_dir = out_dir / profile.name
    data_dir = site_dir / "data"

    cases, labels = _draw_cases(profile, seed, shape)
    site_rng = np.random.default_rng([seed, 5, profile.index])
    splits = _assign_splits(labels, site_rng)
    with_pet = _choose_pet_cases(splits, profile.pet_fraction, site_rng)
    times, events = _draw_survival(cases, site_rng)

    need_pet = "petct_seg" in profile.tasks
    need_mask = need_pet or "ct_seg" in profile.tasks
    rows: dict[str, list[dict[str, Any]]] = {task: [] for task in profile.tasks}
    lesion_free = 0
    for index, case in enumerate(cases):
        rng = np.random.default_rng(list(case.render_seed))
        ct, mask = render_ct(case, profile, rng)
        ct_name = f"images/{case.case_id}_ct.nii.gz"
        label_name = f"images/{case.case_id}_lesion.nii.gz"
        write_nifti(data_dir / ct_name, ct, case.ct_grid.affine)
        if need_mask:
            write_nifti(data_dir / label_name, mask, case.ct_grid.affine)
        lesion_free += int(not mask.any())

        base = {"case_id": case.case_id, "patient_id": case.patient_id, "split": splits[index]}
        if "ct_cls" in rows:
            rows["ct_cls"].append({**base, "ct": ct_name, "class": labels[index]})
        if "ct_prog" in rows:
            rows["ct_prog"].append(
                {**base, "ct": ct_name, "time": times[index], "event": events[index]}
            )
        if "ct_seg" in rows:
            rows["ct_seg"].append({**base, "ct": ct_name, "label": label_name})
        if need_pet and index in with_pet:
            pet_name = f"images/{case.case_id}_pet.nii.gz"
            write_nifti(data_dir / pet_name, render_pet(case, profile, rng), case.pet_grid.affine)
            rows["petct_seg"].append({**base, "ct": ct_name, "pet": pet_name, "label": label_name})

    datasets = []
    for task in profile.tasks:
        manifest = data_dir / f"{task}.csv"
        write_manifest(manifest, _MANIFEST_COLUMNS[task], rows[task])
        spec = _TASKS_BY_NAME[task]
        datasets.append(
            {
                "task": task,
                "kind": spec.kind,
                "modality": spec.modality,
                "format": "csv",
                "manifest": f"data/{task}.csv",
            }
        )
    yaml_path = site_dir / "site.yaml"
    write_site_yaml(
        yaml_path,
        profile.name,
        "state",
        datasets,
        comment=(
            f"Virtual hospital generated by simulation.generate (seed {seed}).\n"
            "Synthetic phantoms only: no patient data."
        ),
    )

    summary = _site_summary(profile, cases, labels, splits, with_pet, events, lesion_free)
    return yaml_path, summary


def _site_summary(
    profile: SiteProfile,
    cases: Sequence[CaseDraw],
    labels: Sequence[int],
    splits: Sequence[str],
    with_pet: set[int],
    events: Sequence[int],
    lesion_free: int,
) -> dict[str, Any]:
    need_pet = "petct_seg" in profile.tasks
    censored = round(1.0 - sum(events) / len(events), 3) if "ct_prog" in profile.tasks else None
    return {
        "site": profile.name,
        "yaml": f"{profile.name}/site.yaml",
        "tasks": list(profile.tasks),
        "num_cases": profile.num_cases,
        "positive_fraction": profile.positive_fraction,
        "class_counts": {"0": sum(y == 0 for y in labels), "1": sum(y == 1 for y in labels)},
        "split_counts": {
            split: sum(s == split for s in splits) for split in ("train", "val", "test")
        },
        "cases_with_pet": len(with_pet) if need_pet else 0,
        "lesion_free_cases": lesion_free,
        "censored_fraction": censored,
        "field_of_view_mm": list(profile.field_of_view_mm),
        "ct_spacing_mm": list(profile.ct_spacing_mm),
        "pet_spacing_mm": list(profile.pet_spacing_mm),
        "hu_offset": profile.hu_offset,
        "hu_scale": profile.hu_scale,
        "ct_noise_hu": profile.ct_noise_hu,
        "pet_noise": profile.pet_noise,
        "suv_calibration": profile.suv_calibration,
        "pet_fraction": profile.pet_fraction,
        "orientations": {
            "ct_lps": sum(case.ct_lps for case in cases),
            "pet_lps": sum(cases[i].pet_lps for i in with_pet) if need_pet else 0,
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Generate a federation from the command line and print the site YAML paths."""
    parser = argparse.ArgumentParser(
        prog="python -m simulation.generate",
        description="Write virtual hospitals with synthetic CT and PET/CT studies.",
    )
    parser.add_argument("out_dir", type=Path, help="folder to write the sites into")
    parser.add_argument("--sites", type=int, default=4, help="number of sites (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--tiny", action="store_true", help="small volumes and 6-8 cases per site")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier generation in out_dir"
    )
    args = parser.parse_args(argv)
    try:
        paths = generate_federation(
            args.out_dir, args.sites, args.seed, tiny=args.tiny, overwrite=args.overwrite
        )
    except SiteBuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
