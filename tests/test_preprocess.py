"""Preprocessing: intensities, resampling, PET/CT pairing, splits, cache and dataset items."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from client.formats import CaseRecord, read_cases
from client.preprocess import (
    CaseDataError,
    PreprocessConfig,
    PreprocessConfigError,
    TaskDataset,
    assign_splits,
    cache_key,
    load_task_dataset,
    preprocess_case,
    split_counts,
)
from client.site_config import DatasetConfig, load_site_config
from tests.conftest import affine_for, write_manifest, write_nifti, write_site

torch.set_num_threads(1)

CONFIG = PreprocessConfig(spacing=(3.0, 3.0, 3.0), patch_size=(16, 16, 16))


def _dataset(tmp_path: Path, kind: str = "segmentation", modality: str = "ct",
             label_map: dict[int, tuple[int, ...]] | None = None) -> DatasetConfig:
    return DatasetConfig("task_a", kind, modality, "csv", tmp_path / "cases.csv", label_map)


def _world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    index = np.argwhere(mask).mean(axis=0)
    return affine[:3, :3] @ index + affine[:3, 3]


# --------------------------------------------------------------------------- deterministic part


def test_preprocess_ct_window_values(tmp_path: Path) -> None:
    ct = np.zeros((5, 4, 4), dtype=np.int16)
    for index, hu in enumerate((-2000, -1000, -300, 400, 1000)):
        ct[index] = hu
    write_nifti(tmp_path / "ct.nii.gz", ct, affine_for((3.0, 3.0, 3.0)))
    case = CaseRecord("c", "p", {"ct": tmp_path / "ct.nii.gz"})

    tensors, affine = preprocess_case(case, _dataset(tmp_path, "classification"), CONFIG, 2)

    image = tensors["image"]
    assert image.dtype == torch.float32
    assert tuple(image.shape) == (1, 5, 4, 4)
    np.testing.assert_allclose(image[0, :, 2, 2].numpy(), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-5)
    np.testing.assert_allclose(affine, affine_for((3.0, 3.0, 3.0)), atol=1e-6)


def test_preprocess_pet_suv_scaled_and_clipped(tmp_path: Path) -> None:
    pet = np.zeros((4, 4, 4), dtype=np.float32)
    pet[0], pet[1], pet[2], pet[3] = -0.3, 0.0, 5.0, 25.0
    write_nifti(tmp_path / "pet.nii.gz", pet, affine_for((3.0, 3.0, 3.0)))
    case = CaseRecord("c", "p", {"pet": tmp_path / "pet.nii.gz"})

    tensors, _ = preprocess_case(case, _dataset(tmp_path, "classification", "pet"), CONFIG, 2)

    np.testing.assert_allclose(tensors["image"][0, :, 1, 1].numpy(), [0.0, 0.0, 0.5, 2.5],
                               atol=1e-5)


def test_preprocess_resamples_lps_to_ras_spacing(tmp_path: Path) -> None:
    # 2 mm LPS CT with a bright cube; after resampling to 3 mm RAS the cube's world
    # centroid must stay where it was.
    affine = affine_for((2.0, 2.0, 2.0), (40.0, 30.0, -10.0), "LPS")
    ct = np.full((24, 24, 24), -1000, dtype=np.int16)
    ct[4:10, 12:20, 6:12] = 400
    write_nifti(tmp_path / "ct.nii.gz", ct, affine)
    case = CaseRecord("c", "p", {"ct": tmp_path / "ct.nii.gz"})

    tensors, out_affine = preprocess_case(case, _dataset(tmp_path, "classification"), CONFIG, 2)

    assert tuple(tensors["image"].shape) == (1, 16, 16, 16)
    np.testing.assert_allclose(np.diag(out_affine)[:3], [3.0, 3.0, 3.0])
    before = _world_centroid(ct > 0, affine)
    after = _world_centroid(tensors["image"][0].numpy() > 0.5, out_affine)
    np.testing.assert_allclose(after, before, atol=1.5)


def test_preprocess_petct_pairs_pet_and_label_on_ct(tmp_path: Path) -> None:
    ct = np.full((18, 18, 18), -1000, dtype=np.int16)
    write_nifti(tmp_path / "ct.nii.gz", ct, affine_for((2.0, 2.0, 2.0)))
    # PET and its mask on a coarser grid over the same 36 mm box, stored LPS.
    pet_affine = affine_for((4.0, 4.0, 4.0), (35.0, 35.0, 1.0), "LPS")
    pet = np.full((9, 9, 9), 5.0, dtype=np.float32)
    mask = np.zeros((9, 9, 9), dtype=np.uint8)
    mask[2:5, 3:6, 3:6] = 7
    write_nifti(tmp_path / "pet.nii.gz", pet, pet_affine)
    write_nifti(tmp_path / "label.nii.gz", mask, pet_affine)
    case = CaseRecord("c", "p", {"ct": tmp_path / "ct.nii.gz", "pet": tmp_path / "pet.nii.gz"},
                      tmp_path / "label.nii.gz")
    dataset = _dataset(tmp_path, "segmentation", "petct", label_map={1: (7,)})

    tensors, out_affine = preprocess_case(case, dataset, CONFIG, 2)

    image, label = tensors["image"], tensors["label"]
    assert tuple(image.shape) == (2, 12, 12, 12)
    assert tuple(label.shape) == (1, 12, 12, 12)
    assert label.dtype == torch.int64
    assert torch.all(image[0] == 0.0)
    np.testing.assert_allclose(image[1, 3:9, 3:9, 3:9].numpy(), 0.5, atol=1e-5)
    assert set(label.unique().tolist()) == {0, 1}
    np.testing.assert_allclose(
        _world_centroid(label[0].numpy() == 1, out_affine),
        _world_centroid(mask == 7, pet_affine),
        atol=1.5,
    )


def test_preprocess_case_with_error_raises(tmp_path: Path) -> None:
    case = CaseRecord("c", "p", {"ct": tmp_path / "absent.nii.gz"})

    with pytest.raises(CaseDataError, match=r"(?s)case c of task 'task_a'.*file-missing"):
        preprocess_case(case, _dataset(tmp_path, "classification"), CONFIG, 2)


def test_preprocess_config_rejects_bad_values() -> None:
    with pytest.raises(PreprocessConfigError, match="ct_window"):
        PreprocessConfig(ct_window=(400.0, -1000.0))
    with pytest.raises(PreprocessConfigError, match="suv_scale"):
        PreprocessConfig(suv_scale=0.0)


# --------------------------------------------------------------------------- splits


def _cases(patients: list[str], per_patient: int = 1) -> list[CaseRecord]:
    return [CaseRecord(f"{p}-{i}", p, {}) for p in patients for i in range(per_patient)]


def test_split_fractions_and_stability() -> None:
    patients = [f"patient-{i:04d}" for i in range(2000)]

    splits = assign_splits(_cases(patients), seed=0)
    reversed_splits = assign_splits(_cases(patients[::-1]), seed=0)
    other_seed = assign_splits(_cases(patients), seed=1)

    fractions = {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}
    assert abs(fractions["train"] - 0.70) < 0.03
    assert abs(fractions["val"] - 0.15) < 0.03
    assert abs(fractions["test"] - 0.15) < 0.03
    assert reversed_splits[::-1] == splits
    assert other_seed != splits


def test_split_keeps_patient_cases_together() -> None:
    splits = assign_splits(_cases([f"p{i}" for i in range(50)], per_patient=3), seed=4)

    for start in range(0, len(splits), 3):
        assert len(set(splits[start:start + 3])) == 1


def test_split_forces_one_train_patient() -> None:
    # Patients that the hash alone puts in val or test.
    patients = [f"p{i}" for i in range(100)]
    outside = [p for p, s in zip(patients, assign_splits(_cases(patients)), strict=True)
               if s != "train"]

    assert assign_splits(_cases(outside[:1])) == ["train"]
    assert assign_splits(_cases(outside[:2])).count("train") == 1


def test_split_counts_uses_manifest_split(tmp_path: Path) -> None:
    rows = [
        {"case_id": f"c{i}", "patient_id": f"p{i}", "ct": "ct.nii.gz", "class": i % 2,
         "split": split}
        for i, split in enumerate(["train", "train", "val", "test", "test"])
    ]
    write_manifest(tmp_path / "cases.csv", rows)
    site = load_site_config(write_site(tmp_path, [{
        "task": "ct_cls", "kind": "classification", "modality": "ct", "format": "csv",
        "manifest": "cases.csv",
    }]))

    assert split_counts(site, "ct_cls") == {"train": 2, "val": 1, "test": 2}


# --------------------------------------------------------------------------- datasets and cache


def _seg_site(tmp_path: Path, volume_shape: tuple[int, int, int] = (20, 18, 10)) -> Any:
    rng = np.random.default_rng(0)
    rows = []
    for index in range(3):
        ct = rng.integers(-1000, 400, volume_shape).astype(np.int16)
        mask = np.zeros(volume_shape, dtype=np.uint8)
        mask[8:11, 8:11, 4:7] = 1
        write_nifti(tmp_path / f"ct{index}.nii.gz", ct, affine_for((3.0, 3.0, 3.0)))
        write_nifti(tmp_path / f"label{index}.nii.gz", mask, affine_for((3.0, 3.0, 3.0)))
        rows.append({"case_id": f"c{index}", "patient_id": f"p{index}",
                     "ct": f"ct{index}.nii.gz", "label": f"label{index}.nii.gz",
                     "split": "train" if index < 2 else "test"})
    write_manifest(tmp_path / "cases.csv", rows)
    return load_site_config(write_site(tmp_path, [{
        "task": "ct_seg", "kind": "segmentation", "modality": "ct", "format": "csv",
        "manifest": "cases.csv",
    }]))


def _case_named(site: Any, case_id: str) -> CaseRecord:
    return next(case for case in read_cases(site.datasets[0]) if case.case_id == case_id)


def test_dataset_segmentation_items_collate(tmp_path: Path) -> None:
    site = _seg_site(tmp_path)

    train = load_task_dataset(site, "ct_seg", CONFIG, "train", True, num_classes=2, seed=3)
    evaluation = load_task_dataset(site, "ct_seg", CONFIG, "test", False, num_classes=2)
    batch = next(iter(DataLoader(train, batch_size=2)))
    whole = evaluation[0]

    assert len(train) == 2
    assert len(evaluation) == 1
    assert tuple(batch["image"].shape) == (2, 1, 16, 16, 16)
    assert tuple(batch["label"].shape) == (2, 1, 16, 16, 16)
    assert batch["image"].dtype == torch.float32
    assert batch["label"].dtype == torch.int64
    assert tuple(whole["image"].shape) == (1, 32, 32, 16)
    assert tuple(whole["label"].shape) == (1, 32, 32, 16)
    assert int(whole["label"].sum()) == 27
    assert type(whole["image"]) is torch.Tensor


def test_dataset_crops_find_foreground(tmp_path: Path) -> None:
    shape = (48, 48, 48)
    write_nifti(tmp_path / "ct.nii.gz", np.zeros(shape, dtype=np.int16), affine_for((3.0,) * 3))
    mask = np.zeros(shape, dtype=np.uint8)
    mask[40:42, 5:7, 20:22] = 1
    write_nifti(tmp_path / "label.nii.gz", mask, affine_for((3.0,) * 3))
    write_manifest(tmp_path / "cases.csv", [
        {"case_id": "c", "patient_id": "p", "ct": "ct.nii.gz", "label": "label.nii.gz"}
    ])
    site = load_site_config(write_site(tmp_path, [{
        "task": "ct_seg", "kind": "segmentation", "modality": "ct", "format": "csv",
        "manifest": "cases.csv",
    }]))
    dataset = load_task_dataset(site, "ct_seg", CONFIG, "train", True, num_classes=2, seed=0)

    with_foreground = sum(int(dataset[0]["label"].sum() > 0) for _ in range(20))

    # A uniform random 16^3 crop of this 48^3 volume contains the 2^3 object with
    # probability (7 * 6 * 15) / 33^3, about 2 %. Foreground-aware sampling centres
    # half of the crops on it.
    assert with_foreground >= 5


def test_dataset_classification_and_prognosis_items(tmp_path: Path) -> None:
    write_nifti(tmp_path / "ct.nii.gz", np.zeros((40, 20, 10), dtype=np.int16),
                affine_for((3.0,) * 3))
    write_manifest(tmp_path / "cls.csv", [
        {"case_id": f"c{i}", "patient_id": f"p{i}", "ct": "ct.nii.gz", "class": i % 2,
         "split": "train"} for i in range(2)
    ])
    write_manifest(tmp_path / "prog.csv", [
        {"case_id": "c", "patient_id": "p", "ct": "ct.nii.gz", "time": 400.5, "event": 1}
    ])
    site = load_site_config(write_site(tmp_path, [
        {"task": "ct_cls", "kind": "classification", "modality": "ct", "format": "csv",
         "manifest": "cls.csv"},
        {"task": "ct_prog", "kind": "prognosis", "modality": "ct", "format": "csv",
         "manifest": "prog.csv"},
    ]))

    cls = next(iter(DataLoader(
        load_task_dataset(site, "ct_cls", CONFIG, "train", True, num_classes=2), batch_size=2
    )))
    prog = load_task_dataset(site, "ct_prog", CONFIG, "train", False, num_classes=2)[0]

    assert tuple(cls["image"].shape) == (2, 1, 16, 16, 16)
    assert cls["class"].tolist() == [0, 1]
    assert cls["class"].dtype == torch.int64
    # 40x20x10 scaled by 16/40 is 16x8x4, centred in the 16^3 patch with zero padding;
    # 0 HU in the window -1000..400 is 1000/1400.
    inside = cls["image"][0, 0]
    np.testing.assert_allclose(inside[:, 4:12, 6:10].numpy(), 1000 / 1400, atol=1e-4)
    assert float(inside.sum()) == pytest.approx(16 * 8 * 4 * 1000 / 1400, rel=1e-4)
    assert tuple(prog["image"].shape) == (1, 16, 16, 16)
    assert prog["time"].dtype == torch.float32
    assert float(prog["time"]) == 400.5
    assert float(prog["event"]) == 1.0
    assert prog["event"].dim() == 0


def test_cache_reused_without_decoding(tmp_path: Path) -> None:
    site = _seg_site(tmp_path)
    first = load_task_dataset(site, "ct_seg", CONFIG, "test", False, num_classes=2)[0]
    entries = sorted(p.name for p in (site.cache_dir / "ct_seg").iterdir())

    # Replace the source with garbage of the same size and modification time: a cache
    # hit never notices, a decode would fail.
    source = tmp_path / "ct2.nii.gz"
    stat = source.stat()
    source.write_bytes(b"\0" * stat.st_size)
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = load_task_dataset(site, "ct_seg", CONFIG, "test", False, num_classes=2)[0]

    assert len(entries) == 2
    assert entries[0].endswith(".json")
    assert entries[1].endswith(".safetensors")
    assert torch.equal(first["image"], second["image"])
    assert torch.equal(first["label"], second["label"])
    uncached = TaskDataset([_case_named(site, "c2")], site.datasets[0], CONFIG, False, 2,
                           tmp_path / "fresh-cache")
    with pytest.raises(CaseDataError, match=r"ct2\.nii\.gz"):
        uncached[0]


def test_cache_key_changes_with_file_and_settings(tmp_path: Path) -> None:
    site = _seg_site(tmp_path)
    case = _case_named(site, "c2")
    dataset = site.datasets[0]

    key = cache_key(case, dataset, CONFIG, 2)
    wider = cache_key(case, dataset, PreprocessConfig(ct_window=(-1000.0, 1000.0)), 2)
    # The patch size only matters after the cache, so it does not change the key.
    other_patch = cache_key(case, dataset, PreprocessConfig(patch_size=(8, 8, 8)), 2)
    os.utime(case.images["ct"], ns=(0, 10**9))
    touched = cache_key(case, dataset, CONFIG, 2)

    assert len({key, wider, touched}) == 3
    assert other_patch == key


def test_cache_corrupt_entry_recomputed(tmp_path: Path) -> None:
    site = _seg_site(tmp_path)
    first = load_task_dataset(site, "ct_seg", CONFIG, "test", False, num_classes=2)[0]
    (tensor_file,) = (site.cache_dir / "ct_seg").glob("*.safetensors")
    tensor_file.write_bytes(b"not a safetensors file")

    second = load_task_dataset(site, "ct_seg", CONFIG, "test", False, num_classes=2)[0]

    assert torch.equal(first["image"], second["image"])
    assert tensor_file.stat().st_size > 100
