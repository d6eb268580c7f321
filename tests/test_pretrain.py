"""Tests of the backbone pretraining on the generated public cohort."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from simulation.pretrain import (
    NODULE_CLASS,
    TISSUE_CLASSES,
    PretrainError,
    PretrainResult,
    PretrainSettings,
    cached_backbone,
    nodule_size_map,
    pooled_statistics,
    render_public_volume,
    standardize_levels,
)
from unicon_model.model import UniconModel
from unicon_model.pretrained import BackboneCheckpointError, load_backbone_checkpoint
from unicon_model.spec import BackboneConfig

torch.set_num_threads(1)

SETTINGS = PretrainSettings(steps=20, batch_size=2, num_volumes=4, patch_size=(16, 16, 16))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pretrained")


@pytest.fixture(scope="module")
def pretrained(cache_dir: Path) -> PretrainResult:
    return cached_backbone(SETTINGS, cache_dir)


def test_pretrain_weights_load_into_backbone(pretrained: PretrainResult) -> None:
    saved = load_file(str(pretrained.weights))
    model = UniconModel(BackboneConfig.preset("tiny"), seed=1)

    loaded = load_backbone_checkpoint(model, pretrained.weights)

    backbone_names = [name for name, _ in model.named_parameters() if name.startswith("backbone.")]
    statistics = ["backbone.pooled_shift", "backbone.pooled_scale"]
    assert sorted(loaded) == sorted(["stems.ct.conv.weight", *backbone_names, *statistics])
    assert torch.equal(model.get_parameter("stems.ct.conv.weight"), saved["convInit.conv.weight"])
    for name in backbone_names:
        assert torch.equal(model.get_parameter(name), saved[name.removeprefix("backbone.")]), name
    assert torch.equal(model.backbone.pooled_shift, saved["unicon.pooled_shift"])
    assert torch.equal(model.backbone.pooled_scale, saved["unicon.pooled_scale"])


def test_pretrain_file_has_only_encoder_keys_and_statistics(pretrained: PretrainResult) -> None:
    keys = set(load_file(str(pretrained.weights)))

    assert "convInit.conv.weight" in keys
    statistics = {"unicon.pooled_shift", "unicon.pooled_scale"}
    assert statistics <= keys
    assert all(
        key == "convInit.conv.weight" or key.startswith("down_layers.")
        for key in keys - statistics
    )


def test_pooled_statistics_reproduce_on_cohort(pretrained: PretrainResult) -> None:
    """Measuring the pooled statistics again on the same cohort gives the saved values."""
    saved = load_file(str(pretrained.weights))
    shift, scale = saved["unicon.pooled_shift"], saved["unicon.pooled_scale"]
    model = UniconModel(BackboneConfig.preset("tiny"), seed=1)
    load_backbone_checkpoint(model, pretrained.weights)
    volumes = [render_public_volume(SETTINGS, index) for index in range(SETTINGS.num_volumes)]

    again_shift, again_scale = pooled_statistics(model, volumes, SETTINGS.whole_volume_size)

    width = 2 * sum(model.config.level_channels)
    assert shift.shape == scale.shape == (width,)
    assert bool((scale > 0).all())
    torch.testing.assert_close(again_shift, shift, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(again_scale, scale, atol=1e-5, rtol=1e-4)


def test_wrong_statistics_shape_rejected(
    pretrained: PretrainResult, tmp_path: Path
) -> None:
    saved = load_file(str(pretrained.weights))
    saved["unicon.pooled_scale"] = torch.ones(7)
    path = tmp_path / "bad.safetensors"
    save_file(saved, str(path))

    with pytest.raises(BackboneCheckpointError, match=r"unicon.pooled_scale: checkpoint \(7,\)"):
        load_backbone_checkpoint(UniconModel(BackboneConfig.preset("tiny"), seed=1), path)


def test_pretrain_loss_falls(pretrained: PretrainResult) -> None:
    curve = pretrained.card["loss_curve"]

    assert [entry["step"] for entry in curve] == [10, 20]
    assert curve[-1]["loss"] < curve[0]["loss"]
    assert curve[-1]["denoising"] < curve[0]["denoising"]


def test_pretrain_card_matches_file(pretrained: PretrainResult) -> None:
    card = pretrained.card

    assert card["cache_key"] == SETTINGS.cache_key()
    assert card["sha256"] == hashlib.sha256(pretrained.weights.read_bytes()).hexdigest()
    assert card["steps"] == 20
    assert card["settings"]["patch_size"] == [16, 16, 16]
    assert set(card["held_out_dice"]) == set(TISSUE_CLASSES)
    assert pretrained.weights.parent.name == SETTINGS.cache_key()


def test_pretrain_cache_reused(pretrained: PretrainResult, cache_dir: Path) -> None:
    modified = pretrained.weights.stat().st_mtime_ns

    again = cached_backbone(SETTINGS, cache_dir)

    assert again.reused
    assert again.weights == pretrained.weights
    assert again.weights.stat().st_mtime_ns == modified
    assert again.card["created_utc"] == pretrained.card["created_utc"]


def test_pretrain_cache_key_follows_settings() -> None:
    other = PretrainSettings(steps=21, batch_size=2, num_volumes=4, patch_size=(16, 16, 16))

    assert other.cache_key() != SETTINGS.cache_key()
    assert PretrainSettings().cache_key() == PretrainSettings().cache_key()


def test_pretrain_cache_retrains_changed_file(tmp_path: Path) -> None:
    settings = PretrainSettings(steps=2, batch_size=1, num_volumes=2, patch_size=(16, 16, 16))
    first = cached_backbone(settings, tmp_path)
    first.weights.write_bytes(first.weights.read_bytes()[:-4] + b"\0\0\0\0")

    second = cached_backbone(settings, tmp_path)

    assert not second.reused
    assert second.card["sha256"] == hashlib.sha256(second.weights.read_bytes()).hexdigest()


def test_pretrain_standardize_keeps_features() -> None:
    model = UniconModel(BackboneConfig.preset("tiny"), seed=2)
    images = torch.rand(2, 1, 16, 16, 16)
    with torch.no_grad():
        before = model.backbone(model.stems["ct"](images))

    rms = standardize_levels(model, images)

    with torch.no_grad():
        after = model.backbone(model.stems["ct"](images))
    for level, (old, new) in enumerate(zip(before, after, strict=True)):
        assert torch.allclose(new, old / rms[level], rtol=1e-3, atol=1e-4), level
        assert float(new.pow(2).mean().sqrt()) == pytest.approx(1.0, rel=1e-3)


def test_pretrain_public_volume_labels_match_image() -> None:
    settings = PretrainSettings()
    volume = next(
        v for v in (render_public_volume(settings, i) for i in range(10))
        if (v.tissue == NODULE_CLASS).sum() >= 10
    )

    # Windowed CT in [0, 1] over -1000..400 HU: lung near 0.1, nodules (25-50 HU) near 0.74.
    lung = volume.clean[volume.tissue == TISSUE_CLASSES.index("lung")]
    nodule = volume.clean[volume.tissue == NODULE_CLASS]
    assert float(np.median(lung)) < 0.2
    assert float(np.median(nodule)) > 0.5
    assert volume.image.shape == volume.tissue.shape == volume.size_map.shape


def test_pretrain_public_volume_deterministic() -> None:
    settings = PretrainSettings()

    first = render_public_volume(settings, 3)
    second = render_public_volume(settings, 3)
    other_seed = render_public_volume(PretrainSettings(seed=1), 3)

    assert np.array_equal(first.image, second.image)
    assert first.image.shape != other_seed.image.shape or not np.array_equal(
        first.image, other_seed.image
    )


def test_pretrain_size_map_per_nodule() -> None:
    mask = np.zeros((10, 10, 10), dtype=bool)
    mask[1:3, 1:3, 1:3] = True  # 8 voxels
    mask[6:9, 6:9, 6:9] = True  # 27 voxels, not touching the first

    size_map = nodule_size_map(mask, spacing_mm=4.0)

    assert size_map[1, 1, 1] == pytest.approx(math.log1p(8 * 64 / 1000.0), rel=1e-6)
    assert size_map[7, 7, 7] == pytest.approx(math.log1p(27 * 64 / 1000.0), rel=1e-6)
    assert size_map[0, 0, 0] == 0.0
    assert size_map[~mask].max() == 0.0


@pytest.mark.parametrize(
    ("field", "value"),
    [("steps", 0), ("patch_size", (20, 16, 16)), ("spacing_mm", (4.0, 3.0)), ("seed", -1)],
)
def test_pretrain_settings_reject_invalid(field: str, value: object) -> None:
    with pytest.raises(PretrainError, match=field):
        PretrainSettings(**{field: value})  # type: ignore[arg-type]
