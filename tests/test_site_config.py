"""Site YAML parsing and the dataset readers (CSV, Decathlon, nnU-Net v2)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.formats import CaseRecord, DatasetError, parse_cases, read_cases, required_columns
from client.site_config import DatasetConfig, SiteConfigError, load_site_config
from client.validation import check_site
from tests.conftest import write_manifest, write_nifti, write_site


def _dataset(**overrides: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "task": "ct_seg", "kind": "segmentation", "modality": "ct", "format": "csv",
        "manifest": "data/ct_seg.csv",
    }
    entry.update(overrides)
    return entry


def _error(tmp_path: Path, datasets: list[dict[str, Any]], **extra: Any) -> str:
    path = write_site(tmp_path, datasets, extra=extra)
    with pytest.raises(SiteConfigError) as caught:
        load_site_config(path)
    message = str(caught.value)
    assert str(path) in message
    return message


# --------------------------------------------------------------------------- YAML


def test_site_config_valid_file_parsed(tmp_path: Path) -> None:
    path = write_site(
        tmp_path,
        [_dataset(label_map={1: [2, 3]}), _dataset(task="ct_prog", kind="prognosis",
                                                   manifest="/abs/prog.csv")],
        site="hospital-a",
        extra={"privacy": {"dp": {"noise_multiplier": 1.0}}},
    )

    config = load_site_config(path)

    assert config.site == "hospital-a"
    assert config.source == path
    assert config.state_dir == tmp_path / "state"
    assert config.cache_dir == tmp_path / "state" / "cache"
    assert config.privacy == {"dp": {"noise_multiplier": 1.0}}
    seg = config.dataset_for("ct_seg")
    assert seg == DatasetConfig(
        task="ct_seg", kind="segmentation", modality="ct", format="csv",
        manifest=tmp_path / "data" / "ct_seg.csv", label_map={1: (2, 3)},
    )
    prog = config.dataset_for("ct_prog")
    assert prog is not None and prog.manifest == Path("/abs/prog.csv")
    assert config.dataset_for("petct_seg") is None
    assert seg.default_num_classes() == 2
    assert prog.default_num_classes() == 2


def test_site_config_label_map_forms(tmp_path: Path) -> None:
    path = write_site(tmp_path, [_dataset(label_map={"2": 5, 1: ["10", 11]})])

    dataset = load_site_config(path).datasets[0]

    assert dataset.label_map == {1: (10, 11), 2: (5,)}
    assert dataset.default_num_classes() == 3


def test_site_config_unknown_key_suggests_spelling(tmp_path: Path) -> None:
    entry = _dataset()
    entry["modalty"] = entry.pop("modality")

    message = _error(tmp_path, [entry])

    assert "unknown key 'datasets[0].modalty'" in message
    assert "did you mean 'modality'?" in message


def test_site_config_unknown_top_key_suggests_spelling(tmp_path: Path) -> None:
    message = _error(tmp_path, [_dataset()], privacyy={})

    assert "unknown key 'privacyy' (did you mean 'privacy'?)" in message


def test_site_config_bad_choice_lists_allowed(tmp_path: Path) -> None:
    message = _error(tmp_path, [_dataset(kind="segmentaton")])

    assert "'datasets[0].kind' is 'segmentaton'" in message
    assert "did you mean 'segmentation'?" in message
    assert "classification, prognosis, segmentation" in message


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"format": "msd", "kind": "classification"}, "segmentation masks only"),
        ({"format": "msd", "modality": "petct"}, "one 4D file"),
        ({"kind": "prognosis", "label_map": {1: [1]}}, "segmentation masks only, so remove"),
        ({"label_map": {0: [1]}}, "task classes are integers >= 1"),
        ({"label_map": {1: [2], 2: [2]}}, "maps source value 2 to classes 1 and 2"),
        ({"label_map": {1: [-1]}}, "source label values are integers >= 0"),
        ({"task": "CT-seg"}, "curriculum task name"),
    ],
)
def test_site_config_invalid_dataset_rejected(
    tmp_path: Path, overrides: dict[str, Any], expected: str
) -> None:
    assert expected in _error(tmp_path, [_dataset(**overrides)])


def test_site_config_duplicate_task_rejected(tmp_path: Path) -> None:
    message = _error(tmp_path, [_dataset(), _dataset(manifest="other.csv")])

    assert "'datasets[1].task' is 'ct_seg', which an earlier dataset already serves" in message


def test_site_config_bad_site_name_rejected(tmp_path: Path) -> None:
    path = write_site(tmp_path, [_dataset()], site="Hospital A")

    with pytest.raises(SiteConfigError, match="key 'site' is 'Hospital A'"):
        load_site_config(path)


def test_site_config_missing_key_and_file(tmp_path: Path) -> None:
    (tmp_path / "site.yaml").write_text("site: a\ndatasets: []\n", encoding="utf-8")
    with pytest.raises(SiteConfigError, match="required key 'state_dir' is missing"):
        load_site_config(tmp_path / "site.yaml")
    with pytest.raises(SiteConfigError, match="site file not found"):
        load_site_config(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("site: [a\n", encoding="utf-8")
    with pytest.raises(SiteConfigError, match="invalid YAML"):
        load_site_config(tmp_path / "bad.yaml")


# --------------------------------------------------------------------------- CSV


def _csv_dataset(tmp_path: Path, kind: str, modality: str) -> DatasetConfig:
    return DatasetConfig(
        task="t", kind=kind, modality=modality, format="csv",
        manifest=tmp_path / "data" / "cases.csv",
    )


def test_required_columns_follow_kind_and_modality(tmp_path: Path) -> None:
    assert required_columns(_csv_dataset(tmp_path, "segmentation", "petct")) == (
        "case_id", "patient_id", "ct", "pet", "label"
    )
    assert required_columns(_csv_dataset(tmp_path, "classification", "pet")) == (
        "case_id", "patient_id", "pet", "class"
    )
    assert required_columns(_csv_dataset(tmp_path, "prognosis", "ct")) == (
        "case_id", "patient_id", "ct", "time", "event"
    )


def test_read_cases_csv_paths_and_values(tmp_path: Path) -> None:
    write_manifest(tmp_path / "data" / "cases.csv", [
        {"case_id": "a", "patient_id": "p1", "ct": "img/a.nii.gz", "time": "365",
         "event": "1", "split": "train"},
        {"case_id": "b", "patient_id": "p2", "ct": "/abs/b.nii.gz", "time": "12.5",
         "event": "0", "split": "test"},
    ])

    cases = read_cases(_csv_dataset(tmp_path, "prognosis", "ct"))

    assert cases == [
        CaseRecord("a", "p1", {"ct": tmp_path / "data" / "img" / "a.nii.gz"}, None, None,
                   365.0, 1, "train"),
        CaseRecord("b", "p2", {"ct": Path("/abs/b.nii.gz")}, None, None, 12.5, 0, "test"),
    ]


def test_read_cases_semicolon_csv(tmp_path: Path) -> None:
    path = tmp_path / "data" / "cases.csv"
    path.parent.mkdir(parents=True)
    path.write_text("case_id;patient_id;pet;class\nx;px;x.nii;1\n", encoding="utf-8")

    cases = read_cases(_csv_dataset(tmp_path, "classification", "pet"))

    assert [(c.case_id, c.images["pet"].name, c.class_label) for c in cases] == [("x", "x.nii", 1)]


def test_read_cases_raises_with_issues(tmp_path: Path) -> None:
    write_manifest(tmp_path / "data" / "cases.csv", [
        {"case_id": "a", "patient_id": "p1", "ct": "a.nii.gz", "class": ""},
    ])

    with pytest.raises(DatasetError, match=r"class \(row 2\)") as caught:
        read_cases(_csv_dataset(tmp_path, "classification", "ct"))

    assert [issue.rule for issue in caught.value.issues] == ["missing-value"]


# --------------------------------------------------------------------------- MSD and nnU-Net


def test_read_cases_msd(tmp_path: Path) -> None:
    (tmp_path / "Task01").mkdir()
    (tmp_path / "Task01" / "dataset.json").write_text(json.dumps({
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "liver"},
        "training": [{"image": "./imagesTr/liver_0.nii.gz", "label": "./labelsTr/liver_0.nii.gz"}],
        "test": ["./imagesTs/liver_9.nii.gz"],
    }), encoding="utf-8")
    dataset = DatasetConfig("ct_seg", "segmentation", "ct", "msd",
                            tmp_path / "Task01" / "dataset.json")

    cases = read_cases(dataset)

    assert cases == [CaseRecord(
        "liver_0", "liver_0", {"ct": tmp_path / "Task01" / "imagesTr" / "liver_0.nii.gz"},
        tmp_path / "Task01" / "labelsTr" / "liver_0.nii.gz",
    )]


def test_read_cases_msd_wrong_modality(tmp_path: Path) -> None:
    (tmp_path / "dataset.json").write_text(json.dumps({
        "modality": {"0": "MRI"}, "training": [],
    }), encoding="utf-8")
    dataset = DatasetConfig("ct_seg", "segmentation", "ct", "msd", tmp_path / "dataset.json")

    _, issues = parse_cases(dataset)

    assert [(i.rule, i.field, i.value) for i in issues] == [
        ("dataset-json-invalid", "modality.0", "MRI")
    ]


def test_read_and_check_nnunet_petct(tmp_path: Path) -> None:
    root = tmp_path / "Dataset001_PETCT"
    (root / "dataset.json").parent.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT", "1": "PET"},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": 2,
        "file_ending": ".nii.gz",
    }), encoding="utf-8")
    rng = np.random.default_rng(0)
    for case in ("pt_001", "pt_002"):
        write_nifti(root / "imagesTr" / f"{case}_0000.nii.gz",
                    rng.integers(-1000, 400, (8, 8, 8)).astype(np.int16))
        write_nifti(root / "imagesTr" / f"{case}_0001.nii.gz",
                    rng.random((8, 8, 8)).astype(np.float32))
        write_nifti(root / "labelsTr" / f"{case}.nii.gz", np.zeros((8, 8, 8), np.uint8))
    path = write_site(tmp_path, [_dataset(task="petct_seg", modality="petct", format="nnunet",
                                          manifest="Dataset001_PETCT")])

    config = load_site_config(path)
    cases = read_cases(config.datasets[0])
    report = check_site(config)

    assert [c.case_id for c in cases] == ["pt_001", "pt_002"]
    assert cases[1].images == {
        "ct": root / "imagesTr" / "pt_002_0000.nii.gz",
        "pet": root / "imagesTr" / "pt_002_0001.nii.gz",
    }
    assert cases[1].label == root / "labelsTr" / "pt_002.nii.gz"
    assert cases[1].patient_id == "pt_002"
    assert report.ok
    assert len(report.files) == 7
