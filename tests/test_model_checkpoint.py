"""Loading MONAI SegResNet and SegResEncoder weights from local safetensors files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.networks.nets import SegResNet
from monai.networks.nets.segresnet_ds import SegResEncoder
from safetensors.torch import save_file

from unicon_model import BackboneConfig, TaskSpec, UniconModel
from unicon_model.pretrained import BackboneCheckpointError, load_backbone_checkpoint

torch.set_num_threads(1)

TINY_GROUP_NORM = ("GROUP", {"num_groups": 4})


def save_state(module: torch.nn.Module, path: Path, prefix: str = "") -> Path:
    save_file({prefix + name: value.contiguous() for name, value in module.state_dict().items()},
              str(path))
    return path


def test_checkpoint_segresnet_loads_with_equal_weights(tmp_path: Path) -> None:
    torch.manual_seed(3)
    reference = SegResNet(init_filters=8, blocks_down=(1, 1, 1, 1), norm=TINY_GROUP_NORM).eval()
    path = save_state(reference, tmp_path / "segresnet.safetensors")
    model = UniconModel(BackboneConfig.preset("tiny"), seed=0)

    loaded = load_backbone_checkpoint(model, path)

    reference_state = reference.state_dict()
    assert len(loaded) == 1 + sum(1 for name in reference_state if name.startswith("down_layers"))
    assert torch.equal(model.get_parameter("stems.ct.conv.weight"),
                       reference_state["convInit.conv.weight"])
    for name, value in reference_state.items():
        if name.startswith("down_layers."):
            assert torch.equal(model.get_parameter(f"backbone.{name}"), value), name


def test_checkpoint_segresnet_features_match_monai(tmp_path: Path) -> None:
    torch.manual_seed(4)
    reference = SegResNet(init_filters=8, blocks_down=(1, 1, 1, 1), norm=TINY_GROUP_NORM).eval()
    model = UniconModel(BackboneConfig.preset("tiny"), seed=0)
    load_backbone_checkpoint(model, save_state(reference, tmp_path / "segresnet.safetensors"))
    images = torch.rand(2, 1, 16, 16, 16)

    with torch.no_grad():
        _, expected = reference.encode(images)
        features = model.backbone(model.stems["ct"](images))

    assert len(features) == len(expected) == 4
    for ours, theirs in zip(features, expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_checkpoint_segres_encoder_layout_maps(tmp_path: Path) -> None:
    torch.manual_seed(5)
    reference = SegResEncoder(
        init_filters=8, blocks_down=(1, 1, 1, 1), norm=("group", {"num_groups": 4})
    ).eval()
    # CT-FM style files wrap the encoder under a prefix such as "encoder.".
    path = save_state(reference, tmp_path / "encoder.safetensors", prefix="encoder.")
    model = UniconModel(BackboneConfig.preset("tiny"), seed=0)
    load_backbone_checkpoint(model, path)
    images = torch.rand(1, 1, 16, 16, 16)

    with torch.no_grad():
        expected = reference(images)
        features = model.backbone(model.stems["ct"](images))

    assert torch.equal(model.get_parameter("backbone.down_layers.2.0.conv.weight"),
                       reference.state_dict()["layers.1.downsample.weight"])
    for ours, theirs in zip(features, expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_checkpoint_batchnorm_statistics_ignored(tmp_path: Path) -> None:
    reference = SegResEncoder(init_filters=8, blocks_down=(1, 1, 1, 1))  # BatchNorm by default
    path = save_state(reference, tmp_path / "batchnorm.safetensors")
    model = UniconModel(BackboneConfig.preset("tiny"), seed=0)

    loaded = load_backbone_checkpoint(model, path)

    assert "backbone.down_layers.0.1.norm1.weight" in loaded
    assert len(loaded) == 1 + sum(1 for name, _ in model.backbone.named_parameters())


def test_checkpoint_mismatch_lists_keys(tmp_path: Path) -> None:
    other = SegResNet(init_filters=16, blocks_down=(1, 2, 2), blocks_up=(1, 1),
                      norm=("GROUP", {"num_groups": 4}))
    path = save_state(other, tmp_path / "other.safetensors")
    model = UniconModel(BackboneConfig.preset("tiny"), seed=0)
    before = model.get_parameter("stems.ct.conv.weight").clone()

    with pytest.raises(BackboneCheckpointError) as error:
        load_backbone_checkpoint(model, path)

    message = str(error.value)
    assert "missing keys" in message
    assert "backbone.down_layers.3.1.conv1.conv.weight" in message
    assert "unexpected keys" in message
    assert "down_layers.1.2.conv1.conv.weight" in message
    assert "shape mismatches" in message
    assert "convInit.conv.weight -> stems.ct.conv.weight: checkpoint (16, 1, 3, 3, 3)" in message
    assert torch.equal(model.get_parameter("stems.ct.conv.weight"), before)


def test_checkpoint_unknown_layout_and_format_rejected(tmp_path: Path) -> None:
    model = UniconModel(BackboneConfig.preset("tiny"), seed=0)
    path = tmp_path / "random.safetensors"
    save_file({"fc.weight": torch.zeros(2, 2)}, str(path))

    with pytest.raises(BackboneCheckpointError, match="layout not recognized"):
        load_backbone_checkpoint(model, path)
    with pytest.raises(BackboneCheckpointError, match=r"only \.safetensors"):
        load_backbone_checkpoint(model, tmp_path / "weights.pt")
    with pytest.raises(BackboneCheckpointError, match="not found"):
        load_backbone_checkpoint(model, tmp_path / "absent.safetensors")


def test_checkpoint_loaded_before_growth_seeds_new_stems(tmp_path: Path) -> None:
    reference = SegResNet(init_filters=8, blocks_down=(1, 1, 1, 1), norm=TINY_GROUP_NORM)
    model = UniconModel(BackboneConfig.preset("tiny"), seed=0)
    load_backbone_checkpoint(model, save_state(reference, tmp_path / "segresnet.safetensors"))

    model.grow(TaskSpec("pet_seg", "segmentation", "pet"))

    assert torch.equal(model.get_parameter("stems.pet.conv.weight"),
                       reference.state_dict()["convInit.conv.weight"])
