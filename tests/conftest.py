"""Shared test helpers: the real-data folder and writers of small NIfTI files and sites.

Tests import the helpers directly (``from tests.conftest import write_nifti``) because
they are plain functions, not fixtures.
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import yaml

# The real studies live outside the repository, in ``shared/`` next to its folder.
REAL_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"

requires_real_data = pytest.mark.skipif(
    not REAL_DATA_DIR.is_dir(),
    reason=f"real studies not found at {REAL_DATA_DIR} (../shared/data/real next to the repo)",
)


@pytest.fixture
def real_data_dir() -> Path:
    """The real-study folder; skips the test when it is absent."""
    if not REAL_DATA_DIR.is_dir():
        pytest.skip(f"real studies not found at {REAL_DATA_DIR}")
    return REAL_DATA_DIR


def affine_for(
    spacing: Sequence[float] = (2.0, 2.0, 2.0),
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    codes: str = "RAS",
) -> np.ndarray:
    """Return a (4, 4) axis-aligned affine with the given spacing, origin and orientation.

    ``codes`` is ``RAS`` or ``LPS``: in LPS the first two axes point left and posterior,
    so their diagonal entries are negative in nibabel's RAS+ world.
    """
    signs = {"RAS": (1, 1, 1), "LPS": (-1, -1, 1)}[codes]
    affine = np.diag([*(s * d for s, d in zip(signs, spacing, strict=True)), 1.0])
    affine[:3, 3] = origin
    return affine


def write_nifti(
    path: Path,
    array: np.ndarray,
    affine: np.ndarray | None = None,
    slope: float | None = None,
    inter: float | None = None,
) -> Path:
    """Write ``array`` as NIfTI-1 with its own dtype; ``.gz`` names are gzip-compressed.

    ``slope``/``inter`` are stored as ``scl_slope``/``scl_inter`` without rescaling the
    stored values, so the decoded values are ``array * slope + inter``.
    """
    image = nib.Nifti1Image(array, affine if affine is not None else affine_for())
    image.header.set_data_dtype(array.dtype)
    if slope is not None or inter is not None:
        # Header fields are set directly because set_slope_inter rejects slope 0,
        # which the NIfTI standard allows and means "no scaling".
        image.header["scl_slope"] = 1.0 if slope is None else slope
        image.header["scl_inter"] = 0.0 if inter is None else inter
    content = image.to_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(content) if path.name.endswith(".gz") else content)
    return path


def write_manifest(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write a CSV manifest whose columns are the keys of the first row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_site(
    folder: Path,
    datasets: Sequence[Mapping[str, Any]],
    site: str = "test-site",
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``folder/site.yaml`` with the given dataset entries and ``state_dir: state``."""
    document: dict[str, Any] = {"site": site, "state_dir": "state", "datasets": list(datasets)}
    document.update(extra or {})
    path = folder / "site.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path
