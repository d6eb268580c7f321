"""One test per fault rule: each builds a small NIfTI (or manifest) showing the fault."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from client.cli import add_site_commands
from client.nifti import RULES, Issue, Severity, decode_volume, load_case_volumes
from client.site_config import load_site_config
from client.validation import SiteReport, check_site
from tests.conftest import affine_for, write_manifest, write_nifti, write_site

torch.set_num_threads(1)

SHAPE = (12, 10, 8)


def _ct(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 400, SHAPE).astype(np.int16)


def _mask() -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[3:8, 2:6, 2:5] = 1
    return mask


def _check(
    tmp_path: Path,
    rows: list[dict[str, Any]],
    kind: str = "segmentation",
    modality: str = "ct",
    label_map: dict[int, list[int]] | None = None,
    num_classes: dict[str, int] | None = None,
) -> SiteReport:
    """Write a one-dataset site around ``rows`` and check it."""
    write_manifest(tmp_path / "cases.csv", rows)
    dataset: dict[str, Any] = {
        "task": "task_a", "kind": kind, "modality": modality, "format": "csv",
        "manifest": "cases.csv",
    }
    if label_map is not None:
        dataset["label_map"] = label_map
    return check_site(load_site_config(write_site(tmp_path, [dataset])), num_classes)


def _seg_rows(image: str = "ct.nii.gz", label: str = "label.nii.gz") -> list[dict[str, Any]]:
    return [{"case_id": "c1", "patient_id": "p1", "ct": image, "label": label}]


def _rules(issues: list[Issue], severity: Severity | None = None) -> list[str]:
    return [i.rule for i in issues if severity is None or i.severity is severity]


def test_fault_rules_table_is_complete() -> None:
    for code, rule in RULES.items():
        assert rule.code == code
        assert rule.summary and rule.fix
        assert isinstance(rule.severity, Severity)


# --------------------------------------------------------------------------- grids


def test_fault_label_in_other_orientation_resampled(tmp_path: Path) -> None:
    # Same world grid stored LPS (image) and RAS (label): axes 0 and 1 flipped.
    lps = affine_for((2.0, 2.0, 2.0), (22.0, 18.0, 0.0), "LPS")
    ras = affine_for((2.0, 2.0, 2.0), (0.0, 0.0, 0.0), "RAS")
    mask = _mask()
    write_nifti(tmp_path / "ct.nii.gz", _ct(), lps)
    write_nifti(tmp_path / "label.nii.gz", mask[::-1, ::-1, :].copy(), ras)

    loaded = load_case_volumes(
        {"ct": tmp_path / "ct.nii.gz"}, tmp_path / "label.nii.gz", "ct", None, 2
    )

    assert _rules(loaded.issues) == ["grid-mismatch"]
    assert loaded.issues[0].severity is Severity.FIXED
    assert loaded.label is not None
    np.testing.assert_array_equal(loaded.label, mask)


def test_fault_pet_on_other_grid_resampled_by_affine(tmp_path: Path) -> None:
    # PET at 4 mm and CT at 2 mm over the same box; PET varies linearly with world x,
    # so its value on the CT grid is known at every interior CT voxel.
    ct_affine = affine_for((2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    pet_affine = affine_for((4.0, 4.0, 4.0), (1.0, 1.0, 1.0))
    pet_shape = (6, 5, 4)
    world_x = 1.0 + 4.0 * np.arange(pet_shape[0])
    pet = np.broadcast_to(world_x[:, None, None] / 10.0, pet_shape).astype(np.float32)
    write_nifti(tmp_path / "ct.nii.gz", _ct(), ct_affine)
    write_nifti(tmp_path / "pet.nii.gz", pet.copy(), pet_affine)

    loaded = load_case_volumes(
        {"ct": tmp_path / "ct.nii.gz", "pet": tmp_path / "pet.nii.gz"}, None, "petct", None, 2
    )

    assert _rules(loaded.issues) == ["grid-mismatch"]
    assert loaded.image is not None
    assert loaded.image.shape == (2, *SHAPE)
    ct_world_x = 2.0 * np.arange(SHAPE[0])
    interior = (ct_world_x >= 1.0) & (ct_world_x <= 21.0)
    expected = ct_world_x[interior] / 10.0
    np.testing.assert_allclose(loaded.image[1, interior, 4, 3], expected, atol=1e-5)


def test_fault_label_with_other_origin_resampled(tmp_path: Path) -> None:
    mask = _mask()
    write_nifti(tmp_path / "ct.nii.gz", _ct(), affine_for((2.0, 2.0, 2.0)))
    # The label grid starts two voxels (4 mm) further along x.
    write_nifti(tmp_path / "label.nii.gz", mask, affine_for((2.0, 2.0, 2.0), (4.0, 0.0, 0.0)))

    loaded = load_case_volumes(
        {"ct": tmp_path / "ct.nii.gz"}, tmp_path / "label.nii.gz", "ct", None, 2
    )

    assert _rules(loaded.issues) == ["grid-mismatch"]
    expected = np.zeros(SHAPE, dtype=np.int64)
    expected[2:, :, :] = mask[:-2, :, :]
    np.testing.assert_array_equal(loaded.label, expected)


def test_fault_label_one_voxel_larger_cropped(tmp_path: Path) -> None:
    mask = np.zeros((SHAPE[0], SHAPE[1], SHAPE[2] + 1), dtype=np.uint8)
    mask[3:8, 2:6, 2:5] = 1
    write_nifti(tmp_path / "ct.nii.gz", _ct())
    write_nifti(tmp_path / "label.nii.gz", mask)

    report = _check(tmp_path, _seg_rows())

    assert report.ok
    assert _rules(report.issues) == ["shape-off-by-one"]
    assert report.issues[0].severity is Severity.WARNING
    loaded = load_case_volumes(
        {"ct": tmp_path / "ct.nii.gz"}, tmp_path / "label.nii.gz", "ct", None, 2
    )
    assert loaded.label is not None
    np.testing.assert_array_equal(loaded.label, mask[:, :, :-1])


def test_fault_label_without_overlap_rejected(tmp_path: Path) -> None:
    write_nifti(tmp_path / "ct.nii.gz", _ct())
    write_nifti(tmp_path / "label.nii.gz", _mask(), affine_for(origin=(500.0, 0.0, 0.0)))

    report = _check(tmp_path, _seg_rows())

    assert not report.ok
    assert _rules(report.issues, Severity.ERROR) == ["no-overlap"]
    assert report.issues[0].file.endswith("label.nii.gz")


def test_fault_no_orientation_warned(tmp_path: Path) -> None:
    (tmp_path / "ct.nii").write_bytes(nib.Nifti1Image(_ct(), None).to_bytes())
    issues: list[Issue] = []

    volume = decode_volume(tmp_path / "ct.nii", "ct", issues)

    assert volume is not None
    assert [(i.rule, i.severity, i.value) for i in issues] == [
        ("no-orientation", Severity.WARNING, "0/0")
    ]


# --------------------------------------------------------------------------- frames and scaling


def test_fault_single_frame_pet_squeezed(tmp_path: Path) -> None:
    pet = np.random.default_rng(1).random((*SHAPE, 1)).astype(np.float32)
    write_nifti(tmp_path / "pet.nii.gz", pet)
    issues: list[Issue] = []

    volume = decode_volume(tmp_path / "pet.nii.gz", "pet", issues)

    assert _rules(issues) == ["single-frame-4d"]
    assert issues[0].severity is Severity.FIXED
    assert volume is not None
    np.testing.assert_array_equal(volume.array, pet[..., 0])


def test_fault_dynamic_pet_rejected(tmp_path: Path) -> None:
    pet = np.random.default_rng(1).random((*SHAPE, 3)).astype(np.float32)
    write_nifti(tmp_path / "pet.nii.gz", pet)
    rows = [{"case_id": "c1", "patient_id": "p1", "pet": "pet.nii.gz", "label": "label.nii.gz"}]
    write_nifti(tmp_path / "label.nii.gz", _mask())

    report = _check(tmp_path, rows, modality="pet")

    assert not report.ok
    assert _rules(report.issues, Severity.ERROR) == ["multi-frame-4d"]
    assert "3 frames" in report.issues[0].message


def test_fault_image_scaling_applied(tmp_path: Path) -> None:
    raw = _ct()
    write_nifti(tmp_path / "scaled.nii.gz", raw, slope=2.0, inter=-1024.0)
    write_nifti(tmp_path / "slope0.nii.gz", raw, slope=0.0, inter=5.0)
    issues: list[Issue] = []

    scaled = decode_volume(tmp_path / "scaled.nii.gz", "ct", issues)
    unscaled = decode_volume(tmp_path / "slope0.nii.gz", "ct", issues)

    assert issues == []
    assert scaled is not None and unscaled is not None
    np.testing.assert_array_equal(scaled.array, raw.astype(np.float32) * 2.0 - 1024.0)
    # scl_slope 0 means "no scaling" in the NIfTI standard, whatever scl_inter holds.
    np.testing.assert_array_equal(unscaled.array, raw.astype(np.float32))


def test_fault_label_scaling_rejected(tmp_path: Path) -> None:
    write_nifti(tmp_path / "ct.nii.gz", _ct())
    write_nifti(tmp_path / "label.nii.gz", _mask(), slope=0.5)

    report = _check(tmp_path, _seg_rows())

    assert _rules(report.issues) == ["label-scaling"]
    assert report.issues[0].severity is Severity.ERROR
    assert report.issues[0].value == "0.5/0"


# --------------------------------------------------------------------------- voxel values


def test_fault_pet_integer_overflow_rejected(tmp_path: Path) -> None:
    # A hot lesion stored as int16: its centre (true 33536) wrapped to -32000.
    raw = np.full(SHAPE, 200, dtype=np.int16)
    raw[4:7, 4:7, 3:6] = 30000
    raw[5, 5, 4] = -32000
    write_nifti(tmp_path / "pet.nii.gz", raw, slope=0.001)
    issues: list[Issue] = []

    volume = decode_volume(tmp_path / "pet.nii.gz", "pet", issues)

    assert volume is None
    assert _rules(issues) == ["pet-integer-overflow"]
    assert "1 voxels" in issues[0].message


def test_fault_pet_small_negatives_accepted(tmp_path: Path) -> None:
    pet = np.full(SHAPE, 1.0, dtype=np.float32)
    pet[0, 0, 0] = -0.05
    pet[5, 5, 4] = 12.0
    write_nifti(tmp_path / "pet.nii.gz", pet)
    issues: list[Issue] = []

    volume = decode_volume(tmp_path / "pet.nii.gz", "pet", issues)

    assert issues == []
    assert volume is not None


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_fault_non_finite_voxels_rejected(tmp_path: Path, bad_value: float) -> None:
    ct = _ct().astype(np.float32)
    ct[1, 2, 3] = bad_value
    write_nifti(tmp_path / "ct.nii.gz", ct)
    write_nifti(tmp_path / "label.nii.gz", _mask())

    report = _check(tmp_path, _seg_rows())

    assert not report.ok
    assert _rules(report.issues) == ["non-finite-voxels"]
    assert report.issues[0].value == f"1 of {ct.size} voxels"


def test_fault_label_value_255_rejected(tmp_path: Path) -> None:
    mask = _mask()
    mask[0, 0, 0] = 255
    write_nifti(tmp_path / "ct.nii.gz", _ct())
    write_nifti(tmp_path / "label.nii.gz", mask)

    report = _check(tmp_path, _seg_rows())

    assert _rules(report.issues) == ["label-values"]
    assert report.issues[0].value == "255"
    assert "classes 0..1" in report.issues[0].message


def test_fault_ct_saved_as_label_rejected(tmp_path: Path) -> None:
    write_nifti(tmp_path / "ct.nii.gz", _ct())
    write_nifti(tmp_path / "label.nii.gz", _ct(seed=3))

    # A label map accepts any source value, but not an image saved as a label.
    report = _check(tmp_path, _seg_rows(), label_map={1: [1]})

    assert _rules(report.issues) == ["label-values"]
    assert "looks like an image" in report.issues[0].message


def test_fault_float_label_near_integer_rounded(tmp_path: Path) -> None:
    mask = _mask().astype(np.float32)
    mask[mask == 1] = 0.99998
    write_nifti(tmp_path / "ct.nii.gz", _ct())
    write_nifti(tmp_path / "label.nii.gz", mask)

    report = _check(tmp_path, _seg_rows())
    loaded = load_case_volumes(
        {"ct": tmp_path / "ct.nii.gz"}, tmp_path / "label.nii.gz", "ct", None, 2
    )

    assert report.ok
    assert _rules(report.issues, Severity.WARNING) == ["label-near-integer"]
    np.testing.assert_array_equal(loaded.label, _mask())


def test_fault_fractional_label_rejected(tmp_path: Path) -> None:
    mask = _mask().astype(np.float32)
    mask[0, 0, :] = 0.5
    write_nifti(tmp_path / "ct.nii.gz", _ct())
    write_nifti(tmp_path / "label.nii.gz", mask)

    report = _check(tmp_path, _seg_rows())

    assert _rules(report.issues) == ["label-fractional"]
    assert report.issues[0].value == f"{SHAPE[2]} voxels such as 0.5"


def test_fault_label_map_class_beyond_task_rejected(tmp_path: Path) -> None:
    write_nifti(tmp_path / "ct.nii.gz", _ct())
    write_nifti(tmp_path / "label.nii.gz", _mask())

    report = _check(tmp_path, _seg_rows(), label_map={2: [1]}, num_classes={"task_a": 2})

    assert _rules(report.issues) == ["label-map-classes"]


# --------------------------------------------------------------------------- files


def test_fault_truncated_gzip_rejected(tmp_path: Path) -> None:
    write_nifti(tmp_path / "ct.nii.gz", _ct())
    content = (tmp_path / "ct.nii.gz").read_bytes()
    (tmp_path / "ct.nii.gz").write_bytes(content[: len(content) // 2])
    write_nifti(tmp_path / "label.nii.gz", _mask())

    report = _check(tmp_path, _seg_rows())

    assert _rules(report.issues) == ["file-truncated"]
    assert report.issues[0].file.endswith("ct.nii.gz")


def test_fault_truncated_uncompressed_rejected(tmp_path: Path) -> None:
    write_nifti(tmp_path / "ct.nii", _ct())
    content = (tmp_path / "ct.nii").read_bytes()
    (tmp_path / "ct.nii").write_bytes(content[:-100])
    issues: list[Issue] = []

    assert decode_volume(tmp_path / "ct.nii", "ct", issues) is None
    assert _rules(issues) == ["file-truncated"]


def test_fault_uncompressed_named_gz_fixed(tmp_path: Path) -> None:
    ct = _ct()
    write_nifti(tmp_path / "plain.nii", ct)
    (tmp_path / "plain.nii").rename(tmp_path / "ct.nii.gz")
    issues: list[Issue] = []

    volume = decode_volume(tmp_path / "ct.nii.gz", "ct", issues)

    assert _rules(issues) == ["compression-mismatch"]
    assert issues[0].severity is Severity.FIXED
    assert volume is not None
    np.testing.assert_array_equal(volume.array, ct.astype(np.float32))
    assert (tmp_path / "ct.nii.gz").read_bytes()[:2] != b"\x1f\x8b"


def test_fault_missing_file_rejected(tmp_path: Path) -> None:
    write_nifti(tmp_path / "ct.nii.gz", _ct())

    report = _check(tmp_path, _seg_rows(label="no_such_label.nii.gz"))

    assert _rules(report.issues) == ["file-missing"]
    assert report.issues[0].file == str(tmp_path / "no_such_label.nii.gz")


# --------------------------------------------------------------------------- manifests


def test_fault_missing_column_rejected(tmp_path: Path) -> None:
    rows = [{"case_id": "c1", "patient_id": "p1", "ct": "ct.nii.gz", "Label": "x.nii.gz"}]

    report = _check(tmp_path, rows)

    assert _rules(report.issues, Severity.ERROR) == ["missing-column"]
    assert report.issues[-1].field == "label"
    assert "rename it to 'label'" in report.issues[-1].message
    assert _rules(report.issues, Severity.WARNING) == ["unknown-column"]


def test_fault_duplicate_case_id_rejected(tmp_path: Path) -> None:
    write_nifti(tmp_path / "ct.nii.gz", _ct())
    rows = [
        {"case_id": "c1", "patient_id": "p1", "ct": "ct.nii.gz", "class": 0},
        {"case_id": "c1", "patient_id": "p2", "ct": "ct.nii.gz", "class": 1},
    ]

    report = _check(tmp_path, rows, kind="classification")

    assert _rules(report.issues) == ["duplicate-case-id"]
    assert report.issues[0].value == "c1"


def test_fault_patient_in_two_splits_rejected(tmp_path: Path) -> None:
    write_nifti(tmp_path / "ct.nii.gz", _ct())
    rows = [
        {"case_id": "c1", "patient_id": "p1", "ct": "ct.nii.gz", "class": 0, "split": "train"},
        {"case_id": "c2", "patient_id": "p1", "ct": "ct.nii.gz", "class": 1, "split": "test"},
        {"case_id": "c3", "patient_id": "p2", "ct": "ct.nii.gz", "class": 1, "split": "tset"},
    ]

    report = _check(tmp_path, rows, kind="classification")

    assert sorted(_rules(report.issues)) == ["invalid-split", "patient-in-several-splits"]
    leak = next(i for i in report.issues if i.rule == "patient-in-several-splits")
    assert leak.value == "p1"
    typo = next(i for i in report.issues if i.rule == "invalid-split")
    assert "did you mean 'test'?" in typo.message


def test_fault_invalid_survival_rows_rejected(tmp_path: Path) -> None:
    write_nifti(tmp_path / "ct.nii.gz", _ct())
    rows = [
        {"case_id": "c1", "patient_id": "p1", "ct": "ct.nii.gz", "time": 0, "event": 1},
        {"case_id": "c2", "patient_id": "p2", "ct": "ct.nii.gz", "time": 300, "event": 2},
        {"case_id": "c3", "patient_id": "p3", "ct": "ct.nii.gz", "time": -5, "event": 0},
        {"case_id": "c4", "patient_id": "p4", "ct": "ct.nii.gz", "time": 120.5, "event": 0},
    ]

    report = _check(tmp_path, rows, kind="prognosis")

    found = [(i.rule, i.field, i.value) for i in report.issues]
    assert found == [
        ("invalid-survival-time", "time (row 2)", "0"),
        ("invalid-survival-event", "event (row 3)", "2"),
        ("invalid-survival-time", "time (row 4)", "-5"),
    ]
    assert report.datasets[0].usable_cases == 1


def test_fault_class_outside_task_rejected(tmp_path: Path) -> None:
    write_nifti(tmp_path / "ct.nii.gz", _ct())
    rows = [
        {"case_id": "c1", "patient_id": "p1", "ct": "ct.nii.gz", "class": 3},
        {"case_id": "c2", "patient_id": "p2", "ct": "ct.nii.gz", "class": 0.5},
    ]

    report = _check(tmp_path, rows, kind="classification", num_classes={"task_a": 3})

    assert [(i.rule, i.value) for i in report.issues] == [
        ("invalid-class", "3"),
        ("invalid-class", "0.5"),
    ]


# --------------------------------------------------------------------------- the command


def _run_cli(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="unicon")
    add_site_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.handler(args))


def test_site_check_cli_json_and_sources_unchanged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mask = _mask()
    mask[0, 0, 0] = 255
    write_nifti(tmp_path / "data" / "ct.nii.gz", _ct())
    write_nifti(tmp_path / "data" / "label.nii.gz", mask)
    write_manifest(tmp_path / "data" / "cases.csv", _seg_rows())
    yaml_path = write_site(tmp_path, [{
        "task": "task_a", "kind": "segmentation", "modality": "ct", "format": "csv",
        "manifest": "data/cases.csv",
    }])
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.rglob("*.*")}

    status = _run_cli(["site", "check", str(yaml_path), "--json"])
    output = json.loads(capsys.readouterr().out)

    assert status == 1
    assert output["ok"] is False
    assert output["errors"] == 1
    label_entry = next(f for f in output["files"] if f["file"].endswith("label.nii.gz"))
    assert label_entry["issues"][0]["rule"] == "label-values"
    assert label_entry["issues"][0]["fix"] == RULES["label-values"].fix
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.rglob("*.*")}
    assert after == before
    assert not (tmp_path / "state").exists()

    # With 256 task classes, 255 is a class and the same site is usable.
    status = _run_cli(["site", "check", str(yaml_path), "--num-classes", "task_a=256"])
    assert status == 0
    assert "Site usable." in capsys.readouterr().out
