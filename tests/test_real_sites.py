"""Tests of the virtual hospitals built from the real sample studies (simulation.real_sites)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
import pytest
import yaml

from simulation.generate import SiteBuildError
from simulation.real_sites import build_adrenal_sites, build_real_sample_sites

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"

pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(
        not (REAL_DATA / "adrenalmnist3d" / "adrenalmnist3d.npz").is_file(),
        reason=f"real sample studies not found at {REAL_DATA}",
    ),
]

SITE_KEYS = {"site", "state_dir", "datasets"}
DATASET_KEYS = {"task", "kind", "modality", "format", "manifest"}
OFFICIAL_SIZES = {"train": 1188, "val": 98, "test": 298}


@pytest.fixture(scope="module")
def sample_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out_dir = tmp_path_factory.mktemp("sample")
    return build_real_sample_sites(REAL_DATA, out_dir, adrenal_per_site=24)


@pytest.fixture(scope="module")
def adrenal_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return build_adrenal_sites(REAL_DATA, tmp_path_factory.mktemp("adrenal"))


def load_nifti(path: Path | str) -> nib.Nifti1Image:
    return cast(nib.Nifti1Image, nib.load(path))


def datasets(yaml_path: Path) -> dict[str, dict[str, Any]]:
    document = yaml.safe_load(yaml_path.read_text())
    return {entry["task"]: entry for entry in document["datasets"]}


def read_manifest(yaml_path: Path, task: str) -> list[dict[str, str]]:
    manifest = yaml_path.parent / str(datasets(yaml_path)[task]["manifest"])
    with manifest.open(newline="") as stream:
        return list(csv.DictReader(stream))


def resolve(yaml_path: Path, task: str, value: str) -> Path:
    manifest = yaml_path.parent / str(datasets(yaml_path)[task]["manifest"])
    path = Path(value)
    return path if path.is_absolute() else manifest.parent / path


def lung_ids(label_file: Path) -> list[int]:
    names = json.loads(label_file.read_text())
    return sorted(int(key) for key, name in names.items() if name.lower().startswith("lung"))


def positive_fraction(rows: list[dict[str, str]], split: str) -> float:
    classes = [int(row["class"]) for row in rows if row["split"] == split]
    return sum(classes) / len(classes)


def test_real_sample_yaml_follows_contract(sample_sites: list[Path]) -> None:
    assert [p.parent.name for p in sample_sites] == ["hospital-a", "hospital-b", "hospital-c"]
    for yaml_path in sample_sites:
        document = yaml.safe_load(yaml_path.read_text())
        assert set(document) == SITE_KEYS
        for entry in document["datasets"]:
            assert DATASET_KEYS <= set(entry) <= DATASET_KEYS | {"label_map"}
    assert set(datasets(sample_sites[0])) == {"ct_cls", "ct_seg", "petct_seg"}
    assert set(datasets(sample_sites[1])) == {"ct_cls", "ct_seg", "petct_seg"}
    assert set(datasets(sample_sites[2])) == {"ct_cls", "petct_seg"}


def test_real_sample_paths_resolve(sample_sites: list[Path]) -> None:
    for yaml_path in sample_sites:
        for task in datasets(yaml_path):
            for row in read_manifest(yaml_path, task):
                for column in ("ct", "pet", "label"):
                    if row.get(column):
                        assert resolve(yaml_path, task, row[column]).is_file(), row[column]


def test_real_sample_studies_not_copied(sample_sites: list[Path]) -> None:
    out_dir = sample_sites[0].parent.parent
    written = [p.relative_to(out_dir) for p in out_dir.rglob("*.nii.gz")]
    assert written
    assert all(path.parts[0] == "adrenalmnist3d" for path in written)
    for yaml_path in sample_sites:
        for task in ("ct_seg", "petct_seg"):
            if task not in datasets(yaml_path):
                continue
            for row in read_manifest(yaml_path, task):
                assert Path(row["ct"]).resolve().is_relative_to(REAL_DATA.resolve())
                assert Path(row["label"]).resolve().is_relative_to(REAL_DATA.resolve())


def test_real_sample_label_maps_match_json(sample_sites: list[Path]) -> None:
    lung1 = datasets(sample_sites[0])["ct_seg"]
    totalseg = datasets(sample_sites[1])["ct_seg"]
    assert lung1["label_map"] == {1: lung_ids(REAL_DATA / "lung1" / "LUNG1-001_labels.json")}
    assert lung1["label_map"] == {1: [2, 3]}
    json_ids = lung_ids(REAL_DATA / "totalseg" / "totalsegmentator_total_v2_labels.json")
    assert totalseg["label_map"] == {1: json_ids}
    assert json_ids == [10, 11, 12, 13, 14]

    seg = load_nifti(REAL_DATA / "totalseg" / "example_seg.nii.gz")
    present = set(np.unique(np.asarray(seg.dataobj)).tolist())
    assert present & set(json_ids)


def test_real_sample_segmentation_mapping(sample_sites: list[Path]) -> None:
    lung1 = read_manifest(sample_sites[0], "ct_seg")
    assert [(row["case_id"], row["split"]) for row in lung1] == [("LUNG1-001", "test")]
    totalseg = read_manifest(sample_sites[1], "ct_seg")
    assert {row["patient_id"] for row in totalseg} == {"totalseg-example"}
    assert {row["split"] for row in totalseg} == {"train"}

    petct = [read_manifest(p, "petct_seg") for p in sample_sites]
    assert [[row["case_id"] for row in rows] for rows in petct] == [
        ["STS_001"],
        ["STS_002"],
        ["STS_003"],
    ]
    for rows in petct:
        row = rows[0]
        ct = load_nifti(row["ct"])
        mask = load_nifti(row["label"])
        assert mask.shape == ct.shape
        assert np.allclose(mask.affine, ct.affine)
        assert load_nifti(row["pet"]).shape != ct.shape


def test_real_sample_class_balance_differs(sample_sites: list[Path]) -> None:
    fractions = [positive_fraction(read_manifest(p, "ct_cls"), "train") for p in sample_sites]
    assert fractions == sorted(fractions)
    assert fractions[-1] - fractions[0] >= 0.3


def test_real_sample_adrenal_cases_disjoint(sample_sites: list[Path]) -> None:
    seen: set[str] = set()
    for yaml_path in sample_sites:
        rows = read_manifest(yaml_path, "ct_cls")
        assert len(rows) == 24
        assert {row["split"] for row in rows} == {"train", "val", "test"}
        for row in rows:
            assert row["case_id"].split("-")[1] == row["split"]
        ids = {row["case_id"] for row in rows}
        assert not ids & seen
        seen |= ids


def test_real_sample_adrenal_conversion(sample_sites: list[Path]) -> None:
    row = read_manifest(sample_sites[0], "ct_cls")[0]
    image = load_nifti(resolve(sample_sites[0], "ct_cls", row["ct"]))
    _, split, index = row["case_id"].split("-")
    with np.load(REAL_DATA / "adrenalmnist3d" / "adrenalmnist3d.npz") as archive:
        source = archive[f"{split}_images"][int(index)]
        label = int(archive[f"{split}_labels"][int(index)][0])
    values = np.asarray(image.dataobj)
    assert image.get_data_dtype() == np.int16
    assert values.shape == (28, 28, 28)
    np.testing.assert_array_equal(values, np.rint(-1000.0 + source.astype(float) * 1400.0 / 255.0))
    assert int(row["class"]) == label
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    np.testing.assert_allclose(image.header.get_zooms(), np.full(3, 64 / 28), rtol=1e-6)


def test_adrenal_sites_use_official_splits(adrenal_sites: list[Path]) -> None:
    assert len(adrenal_sites) == 4
    counts = {"train": 0, "val": 0}
    train_ids: set[str] = set()
    test_sets = []
    for yaml_path in adrenal_sites:
        assert set(datasets(yaml_path)) == {"ct_cls"}
        rows = read_manifest(yaml_path, "ct_cls")
        test_sets.append({row["case_id"] for row in rows if row["split"] == "test"})
        site_train = {row["case_id"] for row in rows if row["split"] == "train"}
        assert not site_train & train_ids
        train_ids |= site_train
        for split in counts:
            counts[split] += sum(row["split"] == split for row in rows)
    assert counts == {"train": OFFICIAL_SIZES["train"], "val": OFFICIAL_SIZES["val"]}
    assert all(len(test) == OFFICIAL_SIZES["test"] for test in test_sets)
    assert all(test == test_sets[0] for test in test_sets)


def test_adrenal_sites_class_balance_differs(adrenal_sites: list[Path]) -> None:
    fractions = [positive_fraction(read_manifest(p, "ct_cls"), "train") for p in adrenal_sites]
    assert fractions == sorted(fractions)
    assert fractions[0] < 0.1
    assert fractions[-1] > 0.33
    test_fraction = positive_fraction(read_manifest(adrenal_sites[0], "ct_cls"), "test")
    assert test_fraction == pytest.approx(69 / 298)


def test_adrenal_sites_paths_resolve(adrenal_sites: list[Path]) -> None:
    for yaml_path in adrenal_sites[:2]:
        for row in read_manifest(yaml_path, "ct_cls"):
            assert resolve(yaml_path, "ct_cls", row["ct"]).is_file(), row["ct"]


def test_adrenal_sites_per_site(tmp_path: Path) -> None:
    paths = build_adrenal_sites(REAL_DATA, tmp_path, num_sites=2, per_site=40)
    for yaml_path in paths:
        rows = read_manifest(yaml_path, "ct_cls")
        assert sum(row["split"] in {"train", "val"} for row in rows) == 40
        assert sum(row["split"] == "test" for row in rows) == OFFICIAL_SIZES["test"]


def test_adrenal_sites_per_site_too_large(tmp_path: Path) -> None:
    with pytest.raises(SiteBuildError, match="per_site"):
        build_adrenal_sites(REAL_DATA, tmp_path / "out", num_sites=4, per_site=1000)
    assert not (tmp_path / "out").exists()


def test_real_sites_missing_files_named(tmp_path: Path) -> None:
    partial = tmp_path / "data"
    (partial / "adrenalmnist3d").mkdir(parents=True)
    archive = REAL_DATA / "adrenalmnist3d" / "adrenalmnist3d.npz"
    (partial / "adrenalmnist3d" / "adrenalmnist3d.npz").symlink_to(archive)
    with pytest.raises(SiteBuildError, match=r"lung1/LUNG1-001_ct_3mm\.nii\.gz"):
        build_real_sample_sites(partial, tmp_path / "sample")
    with pytest.raises(SiteBuildError, match=r"adrenalmnist3d/adrenalmnist3d\.npz"):
        build_adrenal_sites(tmp_path / "empty", tmp_path / "adrenal")


def test_real_sample_needs_two_sites(tmp_path: Path) -> None:
    with pytest.raises(SiteBuildError, match="num_sites"):
        build_real_sample_sites(REAL_DATA, tmp_path / "out", num_sites=1)


def test_real_sample_sites_pass_site_check(sample_sites: list[Path]) -> None:
    site_config = pytest.importorskip("client.site_config")
    validation = pytest.importorskip("client.validation")
    for yaml_path in sample_sites:
        config = site_config.load_site_config(yaml_path)
        seg = config.dataset_for("ct_seg")
        if seg is not None:
            assert seg.label_map == {1: tuple(datasets(yaml_path)["ct_seg"]["label_map"][1])}
        report = validation.check_site(config)
        assert report.ok, report.to_text()
