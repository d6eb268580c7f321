"""Tests of the synthetic federation generator (simulation.generate)."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import yaml
from scipy import ndimage

from simulation.generate import SiteBuildError, generate_federation

SITE_KEYS = {"site", "state_dir", "datasets"}
DATASET_KEYS = {"task", "kind", "modality", "format", "manifest"}
EXPECTED_COLUMNS = {
    "ct_cls": ["case_id", "patient_id", "ct", "class", "split"],
    "ct_prog": ["case_id", "patient_id", "ct", "time", "event", "split"],
    "ct_seg": ["case_id", "patient_id", "ct", "label", "split"],
    "petct_seg": ["case_id", "patient_id", "ct", "pet", "label", "split"],
}


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out_dir = tmp_path_factory.mktemp("federation")
    return generate_federation(out_dir, num_sites=4, seed=3, cases_per_site=(10, 14))


def read_manifest(yaml_path: Path, task: str) -> list[dict[str, str]]:
    with (yaml_path.parent / "data" / f"{task}.csv").open(newline="") as stream:
        return list(csv.DictReader(stream))


def load(yaml_path: Path, relative: str) -> Any:
    return nib.load(yaml_path.parent / "data" / relative)


def pairwise_auc(scores: list[float], labels: list[int]) -> float:
    """AUC as the share of (positive, negative) pairs ranked correctly, ties counting half."""
    positives = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    negatives = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    wins = 0.0
    for positive in positives:
        for negative in negatives:
            if positive > negative:
                wins += 1.0
            elif positive == negative:
                wins += 0.5
    return wins / (len(positives) * len(negatives))


def harrell_c_index(risks: list[float], times: list[float], events: list[int]) -> float:
    """Harrell's C by brute force over comparable pairs (earlier time with an event)."""
    concordant = 0.0
    comparable = 0
    for i, j in itertools.permutations(range(len(times)), 2):
        if events[i] == 1 and times[i] < times[j]:
            comparable += 1
            if risks[i] > risks[j]:
                concordant += 1.0
            elif risks[i] == risks[j]:
                concordant += 0.5
    return concordant / comparable


def test_generate_yaml_follows_contract(federation: list[Path]) -> None:
    assert len(federation) == 4
    for yaml_path in federation:
        document = yaml.safe_load(yaml_path.read_text())
        assert set(document) == SITE_KEYS
        assert document["site"] == yaml_path.parent.name
        assert document["state_dir"] == "state"
        for dataset in document["datasets"]:
            assert set(dataset) == DATASET_KEYS
            assert dataset["format"] == "csv"
            manifest = yaml_path.parent / dataset["manifest"]
            with manifest.open(newline="") as stream:
                header = next(csv.reader(stream))
            assert header == EXPECTED_COLUMNS[dataset["task"]]


def test_generate_manifest_paths_exist(federation: list[Path]) -> None:
    for yaml_path in federation:
        document = yaml.safe_load(yaml_path.read_text())
        for dataset in document["datasets"]:
            for row in read_manifest(yaml_path, dataset["task"]):
                for column in ("ct", "pet", "label"):
                    if column in row:
                        assert (yaml_path.parent / "data" / row[column]).is_file(), row[column]


def test_generate_nifti_dtypes_and_values(federation: list[Path]) -> None:
    yaml_path = federation[0]
    for row in read_manifest(yaml_path, "petct_seg"):
        ct = load(yaml_path, row["ct"])
        pet = load(yaml_path, row["pet"])
        mask = load(yaml_path, row["label"])
        assert ct.get_data_dtype() == np.int16
        assert pet.get_data_dtype() == np.float32
        assert mask.get_data_dtype() == np.uint8
        assert ct.shape == (40, 40, 32)
        assert mask.shape == ct.shape
        assert np.allclose(mask.affine, ct.affine)
        assert set(np.unique(np.asarray(mask.dataobj)).tolist()) <= {0, 1}

        values = np.asarray(ct.dataobj)
        assert values.min() >= -1024
        assert values.max() <= 3071
        zooms = ct.header.get_zooms()
        assert zooms[2] > zooms[0]
        assert pet.header.get_zooms()[0] > zooms[0]
        assert pet.shape != ct.shape
        assert float(np.asarray(pet.dataobj).min()) >= 0.0


def test_generate_orientations_mixed(federation: list[Path]) -> None:
    ct_codes = set()
    pet_codes = set()
    for yaml_path in federation:
        for row in read_manifest(yaml_path, "petct_seg"):
            ct_codes.add(nib.aff2axcodes(load(yaml_path, row["ct"]).affine))
            pet_codes.add(nib.aff2axcodes(load(yaml_path, row["pet"]).affine))
    assert ct_codes == {("R", "A", "S"), ("L", "P", "S")}
    assert pet_codes == {("R", "A", "S"), ("L", "P", "S")}


def map_to_pet(ct: nib.Nifti1Image, pet: nib.Nifti1Image, mask: np.ndarray) -> np.ndarray:
    """PET values at the PET voxels nearest to the world positions of CT voxels in mask."""
    ijk = np.argwhere(mask)
    world = ijk @ ct.affine[:3, :3].T + ct.affine[:3, 3]
    pet_ijk = np.rint((world - pet.affine[:3, 3]) @ np.linalg.inv(pet.affine[:3, :3]).T)
    pet_ijk = pet_ijk.astype(int)
    pet_values = np.asarray(pet.dataobj)
    inside = np.all((pet_ijk >= 0) & (pet_ijk < pet_values.shape), axis=1)
    pet_ijk = pet_ijk[inside]
    return pet_values[pet_ijk[:, 0], pet_ijk[:, 1], pet_ijk[:, 2]]


def test_generate_pet_hot_at_ct_lesions(federation: list[Path]) -> None:
    checked = 0
    for yaml_path in federation:
        for row in read_manifest(yaml_path, "petct_seg"):
            ct = load(yaml_path, row["ct"])
            pet = load(yaml_path, row["pet"])
            mask = np.asarray(load(yaml_path, row["label"]).dataobj) > 0
            if not mask.any():
                continue
            hu = np.asarray(ct.dataobj)
            lung = ndimage.binary_erosion((hu > -900) & (hu < -780), iterations=2)
            lesion_peak = float(map_to_pet(ct, pet, mask).max())
            lung_background = float(np.median(map_to_pet(ct, pet, lung)))
            assert lesion_peak >= 1.5, row["case_id"]
            assert lesion_peak >= 3.0 * lung_background, row["case_id"]
            checked += 1
    assert checked >= 10


def test_generate_pet_has_hot_structures_outside_lesions(federation: list[Path]) -> None:
    yaml_path = federation[0]
    hot_outside = 0
    for row in read_manifest(yaml_path, "petct_seg"):
        ct = load(yaml_path, row["ct"])
        pet = load(yaml_path, row["pet"])
        mask = np.asarray(load(yaml_path, row["label"]).dataobj) > 0
        body = np.asarray(ct.dataobj) > -500
        outside = map_to_pet(ct, pet, body & ~ndimage.binary_dilation(mask, iterations=3))
        hot_outside += int(outside.max() > 3.0)
    assert hot_outside == len(read_manifest(yaml_path, "petct_seg"))


def test_generate_class_balance_differs(federation: list[Path]) -> None:
    fractions = []
    for yaml_path in federation:
        classes = [int(row["class"]) for row in read_manifest(yaml_path, "ct_cls")]
        assert set(classes) == {0, 1}
        fractions.append(sum(classes) / len(classes))
    assert max(fractions) - min(fractions) >= 0.25


def test_generate_survival_times_and_censoring(federation: list[Path]) -> None:
    events = []
    for yaml_path in federation[:-1]:
        for row in read_manifest(yaml_path, "ct_prog"):
            assert float(row["time"]) > 0
            assert row["event"] in {"0", "1"}
            events.append(int(row["event"]))
    censored = 1.0 - sum(events) / len(events)
    assert 0.1 <= censored <= 0.5


def test_generate_last_site_lacks_prognosis(federation: list[Path]) -> None:
    for yaml_path in federation[:-1]:
        tasks = [d["task"] for d in yaml.safe_load(yaml_path.read_text())["datasets"]]
        assert tasks == ["ct_cls", "ct_prog", "ct_seg", "petct_seg"]
    last = federation[-1]
    tasks = [d["task"] for d in yaml.safe_load(last.read_text())["datasets"]]
    assert tasks == ["ct_cls", "ct_seg", "petct_seg"]
    assert not (last.parent / "data" / "ct_prog.csv").exists()


def test_generate_splits_per_patient(federation: list[Path]) -> None:
    for yaml_path in federation:
        split_of: dict[str, str] = {}
        tasks = [d["task"] for d in yaml.safe_load(yaml_path.read_text())["datasets"]]
        for task in tasks:
            rows = read_manifest(yaml_path, task)
            assert {row["split"] for row in rows} == {"train", "val", "test"}, task
            for row in rows:
                assert split_of.setdefault(row["patient_id"], row["split"]) == row["split"]


def test_generate_lesion_free_cases_present(federation: list[Path]) -> None:
    empty = 0
    for yaml_path in federation:
        for row in read_manifest(yaml_path, "ct_seg"):
            empty += int(not np.asarray(load(yaml_path, row["label"]).dataobj).any())
    assert empty >= 3


def test_generate_classification_needs_lesions(federation: list[Path]) -> None:
    mean_hu, lesion_ml, labels = [], [], []
    for yaml_path in federation:
        masks = {row["case_id"]: row["label"] for row in read_manifest(yaml_path, "ct_seg")}
        for row in read_manifest(yaml_path, "ct_cls"):
            ct = load(yaml_path, row["ct"])
            mask = np.asarray(load(yaml_path, masks[row["case_id"]]).dataobj)
            mean_hu.append(float(np.asarray(ct.dataobj).mean()))
            lesion_ml.append(float(mask.sum() * np.prod(ct.header.get_zooms()) / 1000.0))
            labels.append(int(row["class"]))
    hu_auc = pairwise_auc(mean_hu, labels)
    assert max(hu_auc, 1.0 - hu_auc) < 0.9
    assert pairwise_auc(lesion_ml, labels) > 0.8


def test_generate_survival_follows_lesions(federation: list[Path]) -> None:
    risks, times, events = [], [], []
    for yaml_path in federation[:-1]:
        masks = {row["case_id"]: row["label"] for row in read_manifest(yaml_path, "ct_seg")}
        for row in read_manifest(yaml_path, "ct_prog"):
            mask = np.asarray(load(yaml_path, masks[row["case_id"]]).dataobj)
            risks.append(float(mask.sum()))
            times.append(float(row["time"]))
            events.append(int(row["event"]))
    assert harrell_c_index(risks, times, events) > 0.6


def test_generate_cohort_json_has_no_case_values(federation: list[Path]) -> None:
    out_dir = federation[0].parent.parent
    cohort = json.loads((out_dir / "cohort.json").read_text())
    assert cohort["seed"] == 3
    assert [site["site"] for site in cohort["sites"]] == [p.parent.name for p in federation]
    for site, yaml_path in zip(cohort["sites"], federation, strict=True):
        assert site["num_cases"] == len(read_manifest(yaml_path, "ct_cls"))
    assert "hospital-a-001" not in json.dumps(cohort)


def file_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_generate_deterministic_for_seed(tmp_path: Path) -> None:
    generate_federation(tmp_path / "first", num_sites=2, seed=5, tiny=True)
    generate_federation(tmp_path / "second", num_sites=2, seed=5, tiny=True)
    generate_federation(tmp_path / "other", num_sites=2, seed=6, tiny=True)
    first = file_bytes(tmp_path / "first")
    second = file_bytes(tmp_path / "second")
    assert len(first) > 10
    assert first == second

    ct_name = "images/hospital-a-001_ct.nii.gz"
    other = load(tmp_path / "other" / "hospital-a" / "site.yaml", ct_name)
    same = load(tmp_path / "first" / "hospital-a" / "site.yaml", ct_name)
    assert other.shape == same.shape == (24, 24, 16)
    assert not np.array_equal(np.asarray(other.dataobj), np.asarray(same.dataobj))


def test_generate_tiny_sizes(tmp_path: Path) -> None:
    paths = generate_federation(tmp_path, num_sites=3, tiny=True)
    for yaml_path in paths:
        rows = read_manifest(yaml_path, "ct_seg")
        assert 6 <= len(rows) <= 8
        assert load(yaml_path, rows[0]["ct"]).shape == (24, 24, 16)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"num_sites": 0}, "num_sites"),
        ({"cases_per_site": 3}, "cases_per_site"),
        ({"cases_per_site": (9, 6)}, "cases_per_site"),
        ({"shape": (8, 8, 8)}, "shape"),
        ({"tasks": ["ct_segmentation"]}, "tasks"),
        ({"seed": -1}, "seed"),
    ],
)
def test_generate_rejects_invalid_parameters(
    tmp_path: Path, arguments: dict[str, Any], message: str
) -> None:
    with pytest.raises(SiteBuildError, match=message):
        generate_federation(tmp_path / "out", **arguments)
    assert not (tmp_path / "out").exists()


def test_generate_output_folder_rules(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(SiteBuildError, match="not empty"):
        generate_federation(foreign, num_sites=1, tiny=True)

    out_dir = tmp_path / "fed"
    generate_federation(out_dir, num_sites=2, tiny=True, tasks=["ct_seg"])
    with pytest.raises(SiteBuildError, match="already contains generated sites"):
        generate_federation(out_dir, num_sites=1, tiny=True)

    state_file = out_dir / "hospital-b" / "state" / "privacy_ledger.json"
    state_file.parent.mkdir(parents=True)
    state_file.write_text("{}")
    generate_federation(out_dir, num_sites=1, tiny=True, tasks=["ct_cls"], overwrite=True)
    assert state_file.read_text() == "{}"
    assert not (out_dir / "hospital-b" / "site.yaml").exists()
    assert not (out_dir / "hospital-a" / "data" / "ct_seg.csv").exists()
    assert (out_dir / "hospital-a" / "data" / "ct_cls.csv").is_file()


def test_generate_sites_pass_site_check(tmp_path: Path) -> None:
    site_config = pytest.importorskip("client.site_config")
    validation = pytest.importorskip("client.validation")
    for yaml_path in generate_federation(tmp_path, num_sites=2, tiny=True):
        config = site_config.load_site_config(yaml_path)
        assert config.site == yaml_path.parent.name
        assert Path(config.state_dir).resolve() == (yaml_path.parent / "state").resolve()
        report = validation.check_site(config)
        assert report.ok, report.to_text()
