"""Saving and loading models, content hashes and version ids."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from unicon_model import BackboneConfig, TaskSpec, UniconModel
from unicon_model.serialization import (
    SPEC_FILE,
    WEIGHTS_FILE,
    ModelFileError,
    group_hashes,
    load_model,
    save_model,
    version_id,
)

torch.set_num_threads(1)

TASKS = (
    TaskSpec("ct_cls", "classification", "ct"),
    TaskSpec("ct_prog", "prognosis", "ct", time_bins=(90.0, 365.0)),
    TaskSpec("ct_seg", "segmentation", "ct"),
    TaskSpec("petct_seg", "segmentation", "petct", depends_on="ct_seg"),
)


def make_model(seed: int = 0) -> UniconModel:
    model = UniconModel(BackboneConfig.preset("tiny"), seed=seed)
    for task in TASKS:
        model.grow(task)
    with torch.no_grad():  # move every tensor away from its initialization
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    return model


def test_serialization_round_trip_identical(tmp_path: Path) -> None:
    model = make_model()

    version = save_model(model, tmp_path / "v1")
    restored = load_model(tmp_path / "v1")

    assert restored.spec == model.spec
    assert list(restored.state_dict()) == list(model.state_dict())
    for name, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name
    images = torch.rand(1, 2, 16, 16, 16)
    assert torch.equal(restored(images, task="petct_seg"), model(images, task="petct_seg"))
    assert version == version_id(restored.state_dict())
    assert restored.owned_by("petct_seg")[0] == "stems.petct"


def test_serialization_files_written(tmp_path: Path) -> None:
    model = make_model()

    version = save_model(model, tmp_path)

    assert sorted(path.name for path in tmp_path.iterdir()) == [SPEC_FILE, WEIGHTS_FILE]
    document = json.loads((tmp_path / SPEC_FILE).read_text())
    assert document["format"] == "unicon-model-spec"
    assert [task["name"] for task in document["tasks"]] == [task.name for task in TASKS]
    assert document["weights"]["version_id"] == version
    assert document["weights"]["group_hashes"] == group_hashes(model.state_dict())
    assert (tmp_path / WEIGHTS_FILE).read_bytes()[8:9] == b"{"  # safetensors header, no pickle


def test_serialization_group_hash_reference() -> None:
    weight = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    bias = torch.tensor([1.5], dtype=torch.float64)
    state = {"heads.t.fc.weight": weight, "heads.t.fc.bias": bias}

    hashes = group_hashes(state)

    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.numpy().tobytes())
    assert hashes == {"heads.t": digest.hexdigest()}


def test_serialization_group_hashes_change_only_where_changed() -> None:
    model = make_model()
    before = group_hashes(model.state_dict())

    with torch.no_grad():
        model.get_parameter("adapters.ct_seg.down_layers_2_0.up.weight")[0, 0] += 1e-3
    after = group_hashes(model.state_dict())

    assert sorted(before) == [
        "adapters.ct_cls", "adapters.ct_prog", "adapters.ct_seg", "adapters.petct_seg",
        "backbone", "heads.ct_cls", "heads.ct_prog", "heads.ct_seg", "heads.petct_seg",
        "stems.ct", "stems.petct",
    ]
    changed = [group for group in before if before[group] != after[group]]
    assert changed == ["adapters.ct_seg"]
    assert len(version_id(model.state_dict())) == 64


def test_serialization_mixed_saves_detected(tmp_path: Path) -> None:
    save_model(make_model(seed=0), tmp_path / "a")
    save_model(make_model(seed=1), tmp_path / "b")
    shutil.copyfile(tmp_path / "b" / WEIGHTS_FILE, tmp_path / "a" / WEIGHTS_FILE)

    with pytest.raises(ModelFileError, match="come from different saves"):
        load_model(tmp_path / "a")


def test_serialization_missing_and_damaged_files(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="model spec not found"):
        load_model(tmp_path)

    save_model(make_model(), tmp_path)
    (tmp_path / WEIGHTS_FILE).write_bytes(b"not a tensor file")
    with pytest.raises(ModelFileError, match="cannot read safetensors"):
        load_model(tmp_path)

    (tmp_path / SPEC_FILE).write_text("{broken")
    with pytest.raises(ModelFileError, match="invalid JSON at line 1"):
        load_model(tmp_path)


def test_serialization_spec_weights_mismatch_listed(tmp_path: Path) -> None:
    model = make_model()
    save_model(model, tmp_path)
    document = json.loads((tmp_path / SPEC_FILE).read_text())
    document["tasks"] = document["tasks"][:3]  # petct_seg removed from the spec only
    (tmp_path / SPEC_FILE).write_text(json.dumps(document))

    with pytest.raises(ModelFileError, match=r"unexpected \['adapters.petct_seg"):
        load_model(tmp_path)
