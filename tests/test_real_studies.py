"""The example sites in sites/ on the real studies: check, orientation, spacing and values."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.arrayproxy import ArrayProxy

from client.formats import CaseRecord, read_cases
from client.nifti import Issue, decode_volume, load_case_volumes
from client.preprocess import PreprocessConfig, preprocess_case
from client.site_config import DatasetConfig, load_site_config
from client.validation import check_site
from tests.conftest import REAL_DATA_DIR, requires_real_data

torch.set_num_threads(1)

pytestmark = [requires_real_data, pytest.mark.real_data]

SITES_DIR = Path(__file__).resolve().parents[1] / "sites"
LUNG1 = REAL_DATA_DIR / "lung1"
STS = REAL_DATA_DIR / "sts"
WHOLEBODY = REAL_DATA_DIR / "sts_wholebody_pet"


def _load(path: Path) -> nib.Nifti1Image:
    image = nib.load(path)
    assert isinstance(image, nib.Nifti1Image)
    return image


@pytest.mark.parametrize(
    ("site_file", "expected_cases", "expected_fixed"),
    [
        ("hospital-a.yaml", {"ct_seg": 1, "ct_prog": 1}, 0),
        ("hospital-b.yaml", {"ct_seg": 1}, 0),
        # Every STS PET, and the one PET-grid mask, is resampled onto its CT grid.
        ("hospital-c.yaml", {"petct_seg": 3, "pet_seg": 1}, 4),
    ],
)
def test_real_example_site_usable(
    site_file: str, expected_cases: dict[str, int], expected_fixed: int
) -> None:
    report = check_site(load_site_config(SITES_DIR / site_file))

    assert report.ok, report.to_text()
    assert {d.task: d.usable_cases for d in report.datasets} == expected_cases
    assert sum(i.severity.value == "fixed" for i in report.issues) == expected_fixed
    images = [name for name in report.files if name.endswith(".nii.gz")]
    assert images and all(name.startswith(str(REAL_DATA_DIR)) for name in images)


def test_real_site_check_command_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    from simulation.cli import main

    status = main(["site", "check", str(SITES_DIR / "hospital-c.yaml")])

    assert status == 0
    summary = "13 files checked: 0 errors, 0 warnings, 4 fixed. Site usable."
    assert summary in capsys.readouterr().out


def test_real_lung1_ct_orientation_spacing_values() -> None:
    site = load_site_config(SITES_DIR / "hospital-a.yaml")
    dataset = site.dataset_for("ct_seg")
    assert dataset is not None
    case = read_cases(dataset)[0]

    tensors, affine = preprocess_case(case, dataset, PreprocessConfig(), num_classes=2)

    # The file is LPS at 3 mm: RAS flips the first two axes and keeps the spacing.
    source = _load(LUNG1 / "LUNG1-001_ct_3mm.nii.gz")
    hu = np.asanyarray(source.dataobj).astype(np.float32)[::-1, ::-1, :]
    labels = np.asanyarray(_load(LUNG1 / "LUNG1-001_labels_3mm.nii.gz").dataobj)
    lungs = np.isin(labels, (2, 3))[::-1, ::-1, :]
    image, label = tensors["image"], tensors["label"]
    assert tuple(image.shape) == (1, 143, 149, 134)
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    np.testing.assert_allclose(np.diag(affine)[:3], [3.0, 3.0, 3.0], atol=1e-6)
    np.testing.assert_allclose(
        affine[:3, 3], source.affine[:3, :3] @ [142, 148, 0] + source.affine[:3, 3], atol=1e-4
    )
    np.testing.assert_allclose(image[0].numpy(), np.clip((hu + 1000) / 1400, 0, 1), atol=1e-4)
    assert float(image.min()) == 0.0
    assert float(image.max()) == 1.0
    assert torch.equal(label[0], torch.from_numpy(lungs.astype(np.int64)))


def test_real_lps_and_ras_copies_align(tmp_path: Path) -> None:
    source = _load(LUNG1 / "LUNG1-001_ct_3mm.nii.gz")
    ras_copy = nib.as_closest_canonical(source)
    nib.save(ras_copy, tmp_path / "ras.nii.gz")
    dataset = DatasetConfig("ct_cls", "classification", "ct", "csv", tmp_path / "m.csv")
    config = PreprocessConfig(spacing=(4.0, 4.0, 4.0))
    assert nib.aff2axcodes(ras_copy.affine) == ("R", "A", "S")

    lps, lps_affine = preprocess_case(
        CaseRecord("lps", "p", {"ct": LUNG1 / "LUNG1-001_ct_3mm.nii.gz"}), dataset, config, 2
    )
    ras, ras_affine = preprocess_case(
        CaseRecord("ras", "p", {"ct": tmp_path / "ras.nii.gz"}), dataset, config, 2
    )

    np.testing.assert_allclose(lps_affine, ras_affine, atol=1e-6)
    assert torch.equal(lps["image"], ras["image"])


def test_real_wholebody_pet_int16_scaled_to_suv() -> None:
    path = WHOLEBODY / "STS_001_PET_SUVbw_wholebody_int16.nii.gz"
    stored = np.asanyarray(cast(ArrayProxy, _load(path).dataobj).get_unscaled())
    issues: list[Issue] = []

    volume = decode_volume(path, "pet", issues)

    assert issues == []
    assert volume is not None
    assert stored.dtype == np.int16
    assert volume.array.dtype == np.float32
    np.testing.assert_allclose(volume.array, stored * 0.0025, rtol=1e-6, atol=1e-5)
    assert float(volume.array.max()) == pytest.approx(26609 * 0.0025, rel=1e-6)


def test_real_sts_pet_mask_pairs_with_ct_mask() -> None:
    # The same contour saved on the PET grid and on the CT grid: pairing the PET-grid
    # mask onto the CT by affine must reproduce the CT-grid mask.
    images = {"ct": STS / "STS_001_CT_image.nii.gz", "pet": STS / "STS_001_PET_image.nii.gz"}
    from_pet = load_case_volumes(images, STS / "STS_001_PET_mask.nii.gz", "petct", None, 2)
    on_ct = load_case_volumes({"ct": images["ct"]}, STS / "STS_001_CT_mask.nii.gz", "ct", None, 2)

    assert from_pet.label is not None and on_ct.label is not None
    overlap = np.logical_and(from_pet.label, on_ct.label).sum()
    dice = 2 * overlap / (from_pet.label.sum() + on_ct.label.sum())
    assert dice > 0.9
    assert from_pet.image is not None
    # FDG uptake is higher in the tumour than around it.
    pet = from_pet.image[1]
    assert pet[on_ct.label == 1].mean() > 3 * pet[on_ct.label == 0].mean()


def test_real_sts_petct_preprocessed_shape_and_range() -> None:
    site = load_site_config(SITES_DIR / "hospital-c.yaml")
    dataset = site.dataset_for("petct_seg")
    assert dataset is not None
    case = read_cases(dataset)[1]
    ct = _load(case.images["ct"])
    pet_max = float(np.asanyarray(_load(case.images["pet"]).dataobj).max())

    tensors, affine = preprocess_case(case, dataset, PreprocessConfig(), num_classes=2)

    image, label = tensors["image"], tensors["label"]
    extent_mm = np.array(ct.shape) * np.array(ct.header.get_zooms())
    expected_shape = np.round(extent_mm / 3.0).astype(int)
    assert image.shape[0] == 2
    assert np.all(np.abs(np.array(image.shape[1:]) - expected_shape) <= 1)
    assert label.shape[1:] == image.shape[1:]
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    assert float(image[0].min()) == 0.0
    assert float(image[0].max()) == 1.0
    assert float(image[1].min()) >= 0.0
    assert 0.5 * pet_max / 10 < float(image[1].max()) <= pet_max / 10 + 1e-5
    assert set(label.unique().tolist()) == {0, 1}
