"""Build virtual hospitals from the real sample studies.

The real studies are read in place: manifests point at the original NIfTI files by
absolute path, and nothing is copied. Only AdrenalMNIST3D, which ships as one ``.npz``
archive, is converted into small NIfTI files inside ``out_dir``.

Expected layout of ``data_dir`` (the files each builder needs)::

    adrenalmnist3d/adrenalmnist3d.npz           both builders
    adrenalmnist3d/medmnist_info_adrenalmnist3d.txt   optional, gives the voxel spacing
    lung1/LUNG1-001_ct_3mm.nii.gz, LUNG1-001_labels_3mm.nii.gz, LUNG1-001_labels.json
    totalseg/example_ct_sm.nii.gz, example_seg.nii.gz,
             example_ct.nii.gz, example_seg_fast_force_split.nii.gz,
             totalsegmentator_total_v2_labels.json
    sts/STS_00{1,2,3}_CT_image.nii.gz, STS_00{1,2,3}_CT_mask.nii.gz,
        STS_00{1,2,3}_PET_image.nii.gz

AdrenalMNIST3D conversion
-------------------------
Each 28^3 ``uint8`` array becomes an int16 NIfTI with RAS axes and isotropic spacing
64 mm / 28 (about 2.29 mm): the MedMNIST description states that each volume is a 64 mm crop
resized to 28 voxels, and the spacing is read from that description when the file is
present. The arrays are binary shape masks (0 or 255), not CT intensities, so 0 is
written as -1000 HU and 255 as 400 HU (linear in between). These are the ends of the
default CT window, so the CT preprocessing gives back the MedMNIST values divided by 255.
Case ids keep the official split and the array index (``adrenal-train-0042``).

``build_real_sample_sites`` (default 3 sites)
---------------------------------------------
- hospital-a: ``ct_cls`` with 10 % positives; ``ct_seg`` on LUNG1-001 (expert contours
  of both lungs, labels 2 and 3), split test; ``petct_seg`` on STS_001, split train.
- hospital-b: ``ct_cls`` with 30 % positives; ``ct_seg`` on the TotalSegmentator example
  patient (two CT studies with predicted lobe maps, lobe ids read from the label JSON),
  split train; ``petct_seg`` on STS_002, split train.
- hospital-c: ``ct_cls`` with 50 % positives; no ``ct_seg``; ``petct_seg`` on STS_003,
  split test.

With ``n`` sites the positive fractions are spread evenly from 10 % to 50 %; the
segmentation sources go to the first two sites and STS patient ``k`` to site
``(k - 1) mod n``. At least two sites are needed, because LUNG1-001 and TotalSegmentator
label lungs with different ids and a site has one ``label_map`` per task. Each site's
AdrenalMNIST3D cases are disjoint from the other sites' and keep their official split;
split sizes follow the official proportions (1188 : 98 : 298). ``petct_seg`` pairs each
STS CT (HU) with its PET (SUV, own grid) and the tumour mask on the CT grid. The
``ct_seg`` stage therefore trains on TotalSegmentator's model-predicted lobes and is
evaluated on LUNG1-001's expert contours.

``build_adrenal_sites`` (default 4 sites)
-----------------------------------------
AdrenalMNIST3D alone. The official train and val splits are partitioned across sites
with non-IID class balance: site ``i`` receives positives in proportion to a weight
spread evenly from 0.3 to 1.7 (the mean is 1), so with 4 sites the positive fractions
are about 7 %, 17 %, 27 % and 37 % against 22 % overall. Every site lists all 298
official test cases as split ``test`` (one shared set of files), so the federation
evaluates every site on the same test set, as in the MedMNIST benchmark.

Licences: NSCLC-Radiomics (LUNG1) is CC BY-NC 3.0, the soft-tissue-sarcoma studies CC BY
3.0, AdrenalMNIST3D CC BY 4.0 and the TotalSegmentator examples Apache-2.0; cite each
collection as its licence file asks.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from simulation.generate import (
    SiteBuildError,
    prepare_output_dir,
    site_name,
    write_json,
    write_manifest,
    write_nifti,
    write_site_yaml,
)
from unicon_model.log import get_logger

logger = get_logger(__name__)

ADRENAL_NPZ = "adrenalmnist3d/adrenalmnist3d.npz"
ADRENAL_INFO = "adrenalmnist3d/medmnist_info_adrenalmnist3d.txt"
ADRENAL_SPLITS = ("train", "val", "test")
ADRENAL_SHAPE = (28, 28, 28)
ADRENAL_DEFAULT_SPACING_MM = 64.0 / 28.0
ADRENAL_HU_RANGE = (-1000.0, 400.0)
"""HU written for array values 0 and 255 (the default CT window)."""

LUNG1_CT = "lung1/LUNG1-001_ct_3mm.nii.gz"
LUNG1_LABELS = "lung1/LUNG1-001_labels_3mm.nii.gz"
LUNG1_LABEL_NAMES = "lung1/LUNG1-001_labels.json"
TOTALSEG_STUDIES = (
    ("totalseg/example_ct_sm.nii.gz", "totalseg/example_seg.nii.gz"),
    ("totalseg/example_ct.nii.gz", "totalseg/example_seg_fast_force_split.nii.gz"),
)
TOTALSEG_LABEL_NAMES = "totalseg/totalsegmentator_total_v2_labels.json"
STS_PATIENTS = ("STS_001", "STS_002", "STS_003")
STS_SPLITS = {"STS_001": "train", "STS_002": "train", "STS_003": "test"}

_SAMPLE_POSITIVE_FRACTIONS = (0.1, 0.5)
_ADRENAL_WEIGHT_RANGE = (0.3, 1.7)
_ADRENAL_DIR = "adrenalmnist3d"

_CLS_COLUMNS = ("case_id", "patient_id", "ct", "class", "split")
_SEG_COLUMNS = ("case_id", "patient_id", "ct", "label", "split")
_PETCT_COLUMNS = ("case_id", "patient_id", "ct", "pet", "label", "split")


# ---------------------------------------------------------------------------
# Reading the sources
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AdrenalArchive:
    """AdrenalMNIST3D arrays per official split and the voxel spacing to write."""

    images: dict[str, npt.NDArray[np.uint8]]
    labels: dict[str, npt.NDArray[np.int64]]
    spacing_mm: float

    def indices(self, split: str, label: int) -> npt.NDArray[np.int64]:
        """Return the array indices of one class in one official split."""
        return np.flatnonzero(self.labels[split] == label)


def _require_files(data_dir: Path, relative_paths: Sequence[str], builder: str) -> None:
    if not data_dir.is_dir():
        raise SiteBuildError(
            f"{builder}: data_dir {data_dir} is not a folder. Pass the folder that contains the "
            f"real sample studies; it needs {', '.join(relative_paths)}."
        )
    missing = [path for path in relative_paths if not (data_dir / path).is_file()]
    if missing:
        raise SiteBuildError(
            f"{builder}: data_dir {data_dir} lacks {len(missing)} required file(s): "
            f"{', '.join(missing)}. Pass the folder that contains the real sample studies in "
            "their original layout (see the simulation.real_sites module documentation), or "
            "restore the missing files."
        )


def read_adrenal_spacing(info_path: Path) -> float:
    """Read the voxel spacing (mm) of AdrenalMNIST3D from its MedMNIST description.

    The description states the physical crop and the array size (``64mm×64mm×64mm
    volume into 28×28×28``); the spacing is their ratio. Without the file, or when the
    sentence is not found, the documented 64 mm / 28 is returned and the reason logged.
    """
    if not info_path.is_file():
        logger.info("adrenal spacing: %s not found, using 64 mm / 28", info_path)
        return ADRENAL_DEFAULT_SPACING_MM
    text = info_path.read_text(encoding="utf-8", errors="replace")
    match = re.search(r"(\d+(?:\.\d+)?)\s*mm\s*[×x].*?volume into\s*(\d+)\s*[×x]", text)
    if match is None:
        logger.warning(
            "adrenal spacing: no 'NNmm... volume into NN' sentence in %s, using 64 mm / 28",
            info_path,
        )
        return ADRENAL_DEFAULT_SPACING_MM
    return float(match.group(1)) / float(match.group(2))


def load_adrenal_archive(data_dir: Path, builder: str) -> AdrenalArchive:
    """Load and check AdrenalMNIST3D from ``data_dir/adrenalmnist3d/adrenalmnist3d.npz``.

    Raises
    ------
    SiteBuildError
        When the archive is missing, lacks a split, or contains arrays of another shape
        or labels outside {0, 1}.
    """
    _require_files(data_dir, [ADRENAL_NPZ], builder)
    path = data_dir / ADRENAL_NPZ
    images: dict[str, npt.NDArray[np.uint8]] = {}
    labels: dict[str, npt.NDArray[np.int64]] = {}
    with np.load(path, allow_pickle=False) as archive:
        for split in ADRENAL_SPLITS:
            image_key, label_key = f"{split}_images", f"{split}_labels"
            if image_key not in archive.files or label_key not in archive.files:
                raise SiteBuildError(
                    f"{builder}: {path} lacks the arrays '{image_key}' and '{label_key}' "
                    f"(found {sorted(archive.files)}). Use the official MedMNIST file "
                    "adrenalmnist3d.npz (28^3 version)."
                )
            split_images = np.asarray(archive[image_key])
            split_labels = np.asarray(archive[label_key]).reshape(-1).astype(np.int64)
            if split_images.shape[1:] != ADRENAL_SHAPE or len(split_images) != len(split_labels):
                raise SiteBuildError(
                    f"{builder}: {path} array '{image_key}' has shape {split_images.shape} for "
                    f"{len(split_labels)} labels; expected (N, 28, 28, 28). Use the official "
                    "28^3 file adrenalmnist3d.npz, not the 64^3 one."
                )
            if not np.isin(split_labels, (0, 1)).all():
                raise SiteBuildError(
                    f"{builder}: {path} array '{label_key}' contains values "
                    f"{sorted(set(split_labels.tolist()))}; expected binary labels 0 and 1."
                )
            images[split] = split_images.astype(np.uint8)
            labels[split] = split_labels
    spacing = read_adrenal_spacing(data_dir / ADRENAL_INFO)
    return AdrenalArchive(images=images, labels=labels, spacing_mm=spacing)


def read_lung_label_ids(path: Path) -> list[int]:
    """Return the label ids whose names start with 'lung' in a label-name JSON file.

    The file maps label ids to names (``{"10": "lung_upper_lobe_left", ...}``). Lobes in
    TotalSegmentator and whole lungs in LUNG1-001 (``Lung-Left``) both match.

    Raises
    ------
    SiteBuildError
        When the file cannot be read or names no lung label.
    """
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise SiteBuildError(f"Cannot read label names from {path}: {error}.") from error
    if not isinstance(names, dict):
        raise SiteBuildError(f"{path} must map label ids to names, got {type(names).__name__}.")
    ids = sorted(int(key) for key, name in names.items() if str(name).lower().startswith("lung"))
    if not ids:
        raise SiteBuildError(
            f"{path} names no label starting with 'lung' (names: {sorted(names.values())[:8]}...);"
            " the lung segmentation task needs them."
        )
    return ids


# ---------------------------------------------------------------------------
# AdrenalMNIST3D cases
# ---------------------------------------------------------------------------


def _adrenal_case_id(split: str, index: int) -> str:
    return f"adrenal-{split}-{index:04d}"


def _adrenal_relative_path(split: str, index: int) -> str:
    return f"{_ADRENAL_DIR}/{split}/{_adrenal_case_id(split, index)}.nii.gz"


def write_adrenal_nifti(archive: AdrenalArchive, split: str, index: int, out_dir: Path) -> Path:
    """Convert one AdrenalMNIST3D array into an int16 NIfTI under ``out_dir``.

    Returns
    -------
    Path
        The file written, ``out_dir/adrenalmnist3d/<split>/adrenal-<split>-<index>.nii.gz``,
        holding a ``(28, 28, 28)`` volume with 0 -> -1000 HU and 255 -> 400 HU.
    """
    low, high = ADRENAL_HU_RANGE
    values = archive.images[split][index].astype(np.float64)
    hu = np.rint(low + values * (high - low) / 255.0).astype(np.int16)
    spacing = archive.spacing_mm
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -spacing * (np.asarray(ADRENAL_SHAPE) - 1) / 2.0
    path = out_dir / _adrenal_relative_path(split, index)
    write_nifti(path, hu, affine, description="AdrenalMNIST3D shape mask as HU")
    return path


@dataclass
class _AdrenalSelection:
    """AdrenalMNIST3D cases chosen for one site, per official split."""

    indices: dict[str, list[int]]


def _take(pool: list[int], count: int) -> list[int]:
    taken = pool[:count]
    del pool[:count]
    return taken


def _shuffled_pools(
    archive: AdrenalArchive, rng: np.random.Generator
) -> dict[tuple[str, int], list[int]]:
    return {
        (split, label): [int(i) for i in rng.permutation(archive.indices(split, label))]
        for split in ADRENAL_SPLITS
        for label in (0, 1)
    }


def _check_pool_sizes(
    archive: AdrenalArchive,
    requests: Sequence[dict[tuple[str, int], int]],
    parameter: str,
    builder: str,
) -> None:
    for split in ADRENAL_SPLITS:
        for label in (0, 1):
            needed = sum(request.get((split, label), 0) for request in requests)
            available = len(archive.indices(split, label))
            if needed > available:
                kind = "positive" if label == 1 else "negative"
                raise SiteBuildError(
                    f"{builder}: {parameter} asks for {needed} {kind} cases from the official "
                    f"{split} split of AdrenalMNIST3D, which contains {available}; lower "
                    f"{parameter} or the number of sites."
                )


def _largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights`` (largest remainders)."""
    quotas = np.asarray(weights, dtype=float) / float(np.sum(weights)) * total
    counts = np.floor(quotas).astype(int)
    order = np.argsort(-(quotas - counts), kind="stable")
    for index in order[: total - int(counts.sum())]:
        counts[index] += 1
    return [int(c) for c in counts]


def _adrenal_rows(
    selection: _AdrenalSelection, archive: AdrenalArchive, manifest_dir: Path, out_dir: Path
) -> list[dict[str, Any]]:
    rows = []
    for split in ADRENAL_SPLITS:
        for index in selection.indices.get(split, []):
            image = out_dir / _adrenal_relative_path(split, index)
            rows.append(
                {
                    "case_id": _adrenal_case_id(split, index),
                    # NOTE: the archive does not say which two glands share a patient, so
                    # each gland is its own patient. The official splits are patient-level.
                    "patient_id": _adrenal_case_id(split, index),
                    "ct": _relative_to(image, manifest_dir),
                    "class": int(archive.labels[split][index]),
                    "split": split,
                }
            )
    return rows


def _relative_to(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def _class_counts(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        per_split = counts.setdefault(row["split"], {"0": 0, "1": 0})
        per_split[str(row["class"])] += 1
    return counts


# ---------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------


def build_real_sample_sites(
    data_dir: Path,
    out_dir: Path,
    num_sites: int = 3,
    seed: int = 0,
    adrenal_per_site: int = 60,
    overwrite: bool = False,
) -> list[Path]:
    """Build virtual hospitals from all real sample studies (mapping in the module docs).

    Parameters
    ----------
    data_dir : Path
        Folder with the real sample studies in their original layout.
    out_dir : Path
        Folder to write sites, manifests and converted AdrenalMNIST3D files into. It must
        be new, empty, or contain an earlier build (then ``overwrite`` must be true).
    num_sites : int
        Number of sites, at least 2.
    seed : int
        Seed of the AdrenalMNIST3D case selection.
    adrenal_per_site : int
        AdrenalMNIST3D cases per site over train, val and test (at least 7, so that val
        and test get two cases each).
    overwrite : bool
        Replace an earlier build in ``out_dir`` (its listed files only).

    Returns
    -------
    list of Path
        The site YAML files, one per site.

    Raises
    ------
    SiteBuildError
        When a parameter is invalid, a file is missing from ``data_dir`` or ``out_dir``
        cannot be used.
    """
    builder = "build_real_sample_sites"
    if isinstance(num_sites, bool) or not isinstance(num_sites, int) or num_sites < 2:
        raise SiteBuildError(
            f"{builder}: num_sites must be an integer >= 2, got {num_sites!r}: LUNG1-001 and "
            "TotalSegmentator label lungs with different ids, so they need separate sites."
        )
    if isinstance(adrenal_per_site, bool) or not isinstance(adrenal_per_site, int):
        raise SiteBuildError(f"{builder}: adrenal_per_site must be an integer.")
    if adrenal_per_site < 7:
        raise SiteBuildError(
            f"{builder}: adrenal_per_site={adrenal_per_site} is too small; use at least 7 so "
            "that train gets three cases and val and test two each."
        )
    data_dir = Path(data_dir)
    out_dir = Path(out_dir)
    required = [ADRENAL_NPZ, LUNG1_CT, LUNG1_LABELS, LUNG1_LABEL_NAMES, TOTALSEG_LABEL_NAMES]
    required += [path for study in TOTALSEG_STUDIES for path in study]
    for patient in STS_PATIENTS:
        required += [f"sts/{patient}_CT_image.nii.gz", f"sts/{patient}_CT_mask.nii.gz"]
        required += [f"sts/{patient}_PET_image.nii.gz"]
    _require_files(data_dir, required, builder)

    archive = load_adrenal_archive(data_dir, builder)
    lung1_ids = read_lung_label_ids(data_dir / LUNG1_LABEL_NAMES)
    totalseg_ids = read_lung_label_ids(data_dir / TOTALSEG_LABEL_NAMES)
    selections, fractions = _select_sample_adrenal(archive, num_sites, seed, adrenal_per_site)
    prepare_output_dir(out_dir, overwrite)
    source = data_dir.resolve()

    yaml_paths: list[Path] = []
    summaries: list[dict[str, Any]] = []
    written: list[str] = [_ADRENAL_DIR]
    for index in range(num_sites):
        name = site_name(index)
        manifest_dir = out_dir / name / "data"
        datasets: list[dict[str, Any]] = []
        summary: dict[str, Any] = {"site": name, "yaml": f"{name}/site.yaml", "datasets": {}}

        for split, indices in selections[index].indices.items():
            for case_index in indices:
                write_adrenal_nifti(archive, split, case_index, out_dir)
        rows = _adrenal_rows(selections[index], archive, manifest_dir, out_dir)
        write_manifest(manifest_dir / "ct_cls.csv", _CLS_COLUMNS, rows)
        datasets.append(_dataset_entry("ct_cls", "classification", "ct"))
        summary["datasets"]["ct_cls"] = {
            "source": "AdrenalMNIST3D",
            "target_positive_fraction": round(fractions[index], 3),
            "class_counts": _class_counts(rows),
        }

        seg_rows, label_ids, seg_source = _sample_ct_seg(index, source, lung1_ids, totalseg_ids)
        if seg_rows:
            write_manifest(manifest_dir / "ct_seg.csv", _SEG_COLUMNS, seg_rows)
            datasets.append(
                _dataset_entry("ct_seg", "segmentation", "ct", label_map={1: label_ids})
            )
            summary["datasets"]["ct_seg"] = {
                "source": seg_source,
                "label_map": {"1": label_ids},
                "cases": {row["case_id"]: row["split"] for row in seg_rows},
            }

        petct_rows = _sample_petct_seg(index, num_sites, source)
        if petct_rows:
            write_manifest(manifest_dir / "petct_seg.csv", _PETCT_COLUMNS, petct_rows)
            datasets.append(_dataset_entry("petct_seg", "segmentation", "petct"))
            summary["datasets"]["petct_seg"] = {
                "source": "Soft-tissue-Sarcoma (STS) PET/CT",
                "cases": {row["case_id"]: row["split"] for row in petct_rows},
            }

        yaml_path = out_dir / name / "site.yaml"
        write_site_yaml(
            yaml_path,
            name,
            "state",
            datasets,
            comment=(
                f"Virtual hospital built by simulation.real_sites from {source}.\n"
                "Manifests point at the original studies; only AdrenalMNIST3D is converted."
            ),
        )
        yaml_paths.append(yaml_path)
        summaries.append(summary)
        written += [f"{name}/data", f"{name}/site.yaml"]
        logger.info("real sample sites: wrote %s (%s)", name, ", ".join(summary["datasets"]))

    write_json(
        out_dir / "cohort.json",
        {
            "builder": f"simulation.real_sites.{builder}",
            "format_version": 1,
            "data_dir": str(source),
            "seed": seed,
            "num_sites": num_sites,
            "adrenal_per_site": adrenal_per_site,
            "adrenal_conversion": _adrenal_conversion(archive),
            "sites": summaries,
            "written_paths": written,
        },
    )
    return yaml_paths


def _select_sample_adrenal(
    archive: AdrenalArchive, num_sites: int, seed: int, per_site: int
) -> tuple[list[_AdrenalSelection], list[float]]:
    totals = {split: len(archive.labels[split]) for split in ADRENAL_SPLITS}
    all_cases = sum(totals.values())
    val_count = max(2, round(per_site * totals["val"] / all_cases))
    test_count = max(2, round(per_site * totals["test"] / all_cases))
    split_sizes = {"train": per_site - val_count - test_count, "val": val_count, "test": test_count}
    fractions = [float(f) for f in np.linspace(*_SAMPLE_POSITIVE_FRACTIONS, num_sites)]

    # Every split gets at least one case of each class where it has two or more cases,
    # so a per-site AUC can be computed on val and test.
    requests: list[dict[tuple[str, int], int]] = []
    for fraction in fractions:
        request: dict[tuple[str, int], int] = {}
        for split, size in split_sizes.items():
            positives = min(max(round(fraction * size), 1), size - 1)
            request[(split, 1)] = positives
            request[(split, 0)] = size - positives
        requests.append(request)
    _check_pool_sizes(archive, requests, "adrenal_per_site", "build_real_sample_sites")

    pools = _shuffled_pools(archive, np.random.default_rng([seed, 11]))
    selections = []
    for request in requests:
        indices: dict[str, list[int]] = {}
        for split in ADRENAL_SPLITS:
            chosen = _take(pools[(split, 1)], request[(split, 1)])
            chosen += _take(pools[(split, 0)], request[(split, 0)])
            indices[split] = sorted(chosen)
        selections.append(_AdrenalSelection(indices))
    return selections, fractions


def _sample_ct_seg(
    site_index: int, source: Path, lung1_ids: list[int], totalseg_ids: list[int]
) -> tuple[list[dict[str, Any]], list[int], str]:
    if site_index == 0:
        rows = [
            {
                "case_id": "LUNG1-001",
                "patient_id": "LUNG1-001",
                "ct": str(source / LUNG1_CT),
                "label": str(source / LUNG1_LABELS),
                "split": "test",
            }
        ]
        return rows, lung1_ids, "NSCLC-Radiomics LUNG1-001, expert lung contours"
    if site_index == 1:
        # Both TotalSegmentator examples image the same patient (the small CT repeats 30
        # slices of the large one), so they share a patient id and a split.
        rows = [
            {
                "case_id": Path(ct).name.removesuffix(".nii.gz"),
                "patient_id": "totalseg-example",
                "ct": str(source / ct),
                "label": str(source / label),
                "split": "train",
            }
            for ct, label in TOTALSEG_STUDIES
        ]
        return rows, totalseg_ids, "TotalSegmentator examples, predicted lung lobes"
    return [], [], ""


def _sample_petct_seg(site_index: int, num_sites: int, source: Path) -> list[dict[str, Any]]:
    rows = []
    for number, patient in enumerate(STS_PATIENTS):
        if number % num_sites != site_index:
            continue
        rows.append(
            {
                "case_id": patient,
                "patient_id": patient,
                "ct": str(source / f"sts/{patient}_CT_image.nii.gz"),
                "pet": str(source / f"sts/{patient}_PET_image.nii.gz"),
                "label": str(source / f"sts/{patient}_CT_mask.nii.gz"),
                "split": STS_SPLITS[patient],
            }
        )
    return rows


def build_adrenal_sites(
    data_dir: Path,
    out_dir: Path,
    num_sites: int = 4,
    seed: int = 0,
    per_site: int | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Build virtual hospitals from AdrenalMNIST3D alone, with non-IID class balance.

    Parameters
    ----------
    data_dir : Path
        Folder that contains ``adrenalmnist3d/adrenalmnist3d.npz``.
    out_dir : Path
        Folder to write into. It must be new, empty, or contain an earlier build (then
        ``overwrite`` must be true).
    num_sites : int
        Number of sites, at least 1.
    seed : int
        Seed of the partition of the official train and val splits.
    per_site : int, optional
        Train plus val cases per site. Default: all 1286 official train and val cases
        are shared out in near-equal site sizes. Test cases are not counted: every site
        lists all 298 official test cases.
    overwrite : bool
        Replace an earlier build in ``out_dir`` (its listed files only).

    Returns
    -------
    list of Path
        The site YAML files, one per site.

    Raises
    ------
    SiteBuildError
        When a parameter is invalid, the archive is missing or malformed, the official
        splits hold too few cases for ``per_site``, or ``out_dir`` cannot be used.
    """
    builder = "build_adrenal_sites"
    if isinstance(num_sites, bool) or not isinstance(num_sites, int) or num_sites < 1:
        raise SiteBuildError(f"{builder}: num_sites must be an integer >= 1, got {num_sites!r}.")
    if per_site is not None and (
        isinstance(per_site, bool) or not isinstance(per_site, int) or per_site < 2
    ):
        raise SiteBuildError(
            f"{builder}: per_site must be None or an integer >= 2 (one train and one val "
            f"case), got {per_site!r}."
        )
    data_dir = Path(data_dir)
    out_dir = Path(out_dir)
    archive = load_adrenal_archive(data_dir, builder)
    selections, weights = _partition_adrenal(archive, num_sites, seed, per_site)
    prepare_output_dir(out_dir, overwrite)

    test_indices = list(range(len(archive.labels["test"])))
    for split in ("train", "val"):
        used = sorted({i for selection in selections for i in selection.indices[split]})
        for case_index in used:
            write_adrenal_nifti(archive, split, case_index, out_dir)
    for case_index in test_indices:
        write_adrenal_nifti(archive, "test", case_index, out_dir)

    yaml_paths: list[Path] = []
    summaries: list[dict[str, Any]] = []
    written: list[str] = [_ADRENAL_DIR]
    for index, selection in enumerate(selections):
        name = site_name(index)
        selection.indices["test"] = test_indices
        manifest_dir = out_dir / name / "data"
        rows = _adrenal_rows(selection, archive, manifest_dir, out_dir)
        write_manifest(manifest_dir / "ct_cls.csv", _CLS_COLUMNS, rows)
        yaml_path = out_dir / name / "site.yaml"
        write_site_yaml(
            yaml_path,
            name,
            "state",
            [_dataset_entry("ct_cls", "classification", "ct")],
            comment=(
                "Virtual hospital built by simulation.real_sites from AdrenalMNIST3D "
                "(CC BY 4.0).\nThe test split is the official one, shared by every site."
            ),
        )
        yaml_paths.append(yaml_path)
        summaries.append(
            {
                "site": name,
                "yaml": f"{name}/site.yaml",
                "positive_weight": round(weights[index], 3),
                "class_counts": _class_counts(rows),
            }
        )
        written += [f"{name}/data", f"{name}/site.yaml"]
        logger.info("adrenal sites: wrote %s with %d cases", name, len(rows))

    write_json(
        out_dir / "cohort.json",
        {
            "builder": f"simulation.real_sites.{builder}",
            "format_version": 1,
            "data_dir": str(data_dir.resolve()),
            "seed": seed,
            "num_sites": num_sites,
            "per_site": per_site,
            "adrenal_conversion": _adrenal_conversion(archive),
            "sites": summaries,
            "written_paths": written,
        },
    )
    return yaml_paths


def _partition_adrenal(
    archive: AdrenalArchive, num_sites: int, seed: int, per_site: int | None
) -> tuple[list[_AdrenalSelection], list[float]]:
    weights = (
        [float(w) for w in np.linspace(*_ADRENAL_WEIGHT_RANGE, num_sites)]
        if num_sites > 1
        else [1.0]
    )
    totals = {split: len(archive.labels[split]) for split in ("train", "val")}
    positives_total = {split: len(archive.indices(split, 1)) for split in ("train", "val")}

    if per_site is None:
        sizes = {split: _largest_remainder(totals[split], [1.0] * num_sites) for split in totals}
    else:
        val_size = max(1, round(per_site * totals["val"] / sum(totals.values())))
        sizes = {"train": [per_site - val_size] * num_sites, "val": [val_size] * num_sites}

    requests: list[dict[tuple[str, int], int]] = [{} for _ in range(num_sites)]
    for split in ("train", "val"):
        rate = positives_total[split] / totals[split]
        if per_site is None:
            positives = _largest_remainder(positives_total[split], weights)
        else:
            positives = [
                round(rate * weight * size)
                for weight, size in zip(weights, sizes[split], strict=True)
            ]
        for site, (count, size) in enumerate(zip(positives, sizes[split], strict=True)):
            requests[site][(split, 1)] = min(count, size)
            requests[site][(split, 0)] = size - min(count, size)
    _check_pool_sizes(archive, requests, "per_site", "build_adrenal_sites")

    pools = _shuffled_pools(archive, np.random.default_rng([seed, 12]))
    selections = []
    for request in requests:
        indices: dict[str, list[int]] = {}
        for split in ("train", "val"):
            chosen = _take(pools[(split, 1)], request[(split, 1)])
            chosen += _take(pools[(split, 0)], request[(split, 0)])
            indices[split] = sorted(chosen)
        selections.append(_AdrenalSelection(indices))
    return selections, weights


def _dataset_entry(
    task: str, kind: str, modality: str, label_map: dict[int, list[int]] | None = None
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "task": task,
        "kind": kind,
        "modality": modality,
        "format": "csv",
        "manifest": f"data/{task}.csv",
    }
    if label_map is not None:
        entry["label_map"] = label_map
    return entry


def _adrenal_conversion(archive: AdrenalArchive) -> dict[str, Any]:
    return {
        "spacing_mm": round(archive.spacing_mm, 6),
        "orientation": "RAS",
        "dtype": "int16",
        "hu_for_0": ADRENAL_HU_RANGE[0],
        "hu_for_255": ADRENAL_HU_RANGE[1],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Build real-data sites from the command line and print the site YAML paths."""
    parser = argparse.ArgumentParser(
        prog="python -m simulation.real_sites",
        description="Write virtual hospitals whose manifests point at the real sample studies.",
    )
    parser.add_argument("kind", choices=["sample", "adrenal"], help="which builder to run")
    parser.add_argument("data_dir", type=Path, help="folder of the real sample studies")
    parser.add_argument("out_dir", type=Path, help="folder to write the sites into")
    parser.add_argument("--sites", type=int, default=None, help="number of sites (3 or 4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--per-site",
        type=int,
        default=None,
        help="AdrenalMNIST3D cases per site (sample: default 60; adrenal: default all)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier build in out_dir"
    )
    args = parser.parse_args(argv)

    try:
        if args.kind == "sample":
            paths = build_real_sample_sites(
                args.data_dir,
                args.out_dir,
                num_sites=args.sites or 3,
                seed=args.seed,
                adrenal_per_site=args.per_site or 60,
                overwrite=args.overwrite,
            )
        else:
            paths = build_adrenal_sites(
                args.data_dir,
                args.out_dir,
                num_sites=args.sites or 4,
                seed=args.seed,
                per_site=args.per_site,
                overwrite=args.overwrite,
            )
    except SiteBuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
