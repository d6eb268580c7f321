"""Growing the model: output shapes, stems, dependencies, trainable sets and isolation of tasks."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets.segresnet_ds import SegResEncoder as MonaiSegResEncoder

from unicon_model import BackboneConfig, ModelInputError, ModelSpecError, TaskSpec, UniconModel
from unicon_model.losses import task_loss

torch.set_num_threads(1)

CT_CLS = TaskSpec("ct_cls", "classification", "ct")
CT_PROG = TaskSpec("ct_prog", "prognosis", "ct", time_bins=(100.0, 200.0, 400.0))
CT_SEG = TaskSpec("ct_seg", "segmentation", "ct", num_classes=3)
PETCT_SEG = TaskSpec("petct_seg", "segmentation", "petct", num_classes=3, depends_on="ct_seg")

# Parameter counts of the tiny preset, by hand:
# stem 8*1*27 = 216; level 0 block 2*8*8*27 + 4*8 = 3488; level 1 down 16*8*27 + block
# 2*16*16*27 + 4*16 = 17344; level 2 = 69248; level 3 = 276736; backbone 366816.
TINY_BACKBONE_AND_STEM = 216 + 366816
# Adapters, rank 4: 4 * (in + out) per convolution, summed over the 10 convolutions.
TINY_ADAPTERS = 4 * (16 + 16) + 4 * (24 + 32 + 32) + 4 * (48 + 64 + 64) + 4 * (96 + 128 + 128)
# Classification head: Linear over mean and max of every level, 2 * (8 + 16 + 32 + 64) inputs.
TINY_CLS_HEAD = 2 * (8 + 16 + 32 + 64) * 2 + 2
# Segmentation head, 3 classes: laterals (8+16+32+64)*8 + 4*8, three blocks 16 + 8*8*27,
# final GroupNorm 16 + conv 8*3 + 3.
TINY_SEG_HEAD_3 = 960 + 32 + 3 * (16 + 1728) + 16 + 27


def make_model(*tasks: TaskSpec) -> UniconModel:
    model = UniconModel(BackboneConfig.preset("tiny"), seed=0)
    for index, task in enumerate(tasks):
        model.grow(task, seed=index + 1)
    return model


def count(model: UniconModel, names: list[str]) -> int:
    return sum(model.get_parameter(name).numel() for name in names)


def test_model_output_shapes_per_kind() -> None:
    cox = TaskSpec("ct_cox", "prognosis", "ct")
    model = make_model(CT_CLS, CT_PROG, cox, CT_SEG, PETCT_SEG)
    ct = torch.rand(2, 1, 16, 16, 16)

    assert model(ct, task="ct_cls").shape == (2, 2)
    assert model(ct, task="ct_prog").shape == (2, 4)
    assert model(ct, task="ct_cox").shape == (2, 1)
    assert model(torch.rand(1, 1, 32, 16, 24), task="ct_seg").shape == (1, 3, 32, 16, 24)
    assert model(torch.rand(2, 2, 16, 16, 16), task="petct_seg").shape == (2, 3, 16, 16, 16)


def test_model_rejects_bad_inputs() -> None:
    model = make_model(CT_SEG)

    with pytest.raises(ModelInputError, match=r"expects images of shape \(B, 1, D, H, W\)"):
        model(torch.rand(1, 2, 16, 16, 16), task="ct_seg")
    with pytest.raises(ModelInputError, match="divisible by 8"):
        model(torch.rand(1, 1, 16, 16, 12), task="ct_seg")
    with pytest.raises(ModelInputError, match="unknown task 'ct_cls'"):
        model(torch.rand(1, 1, 16, 16, 16), task="ct_cls")


def test_model_grow_rejects_duplicate_and_unknown_parent() -> None:
    model = make_model(CT_SEG)

    with pytest.raises(ModelSpecError, match="already exists"):
        model.grow(CT_SEG)
    with pytest.raises(ModelSpecError, match="not an earlier task"):
        model.grow(TaskSpec("pet_seg", "segmentation", "pet", depends_on="ct_cls"))


def test_model_grow_returns_new_parameter_names() -> None:
    model = make_model(CT_SEG)

    names = model.grow(PETCT_SEG, seed=5)

    assert names[0] == "stems.petct.conv.weight"
    assert all(name.startswith(("stems.petct.", "adapters.petct_seg.", "heads.petct_seg."))
               for name in names)
    assert count(model, names) == 8 * 2 * 27 + TINY_ADAPTERS + TINY_SEG_HEAD_3
    assert model.owned_by("petct_seg") == ["stems.petct", "adapters.petct_seg", "heads.petct_seg"]


def test_model_petct_stem_starts_as_ct_stem() -> None:
    model = make_model(CT_SEG, PETCT_SEG)
    images = torch.rand(2, 2, 16, 16, 16)

    petct_features = model.stems["petct"](images)
    ct_features = model.stems["ct"](images[:, :1])

    torch.testing.assert_close(petct_features, ct_features, rtol=0, atol=1e-6)
    assert torch.count_nonzero(model.get_parameter("stems.petct.conv.weight")[:, 1]) == 0


def test_model_pet_stem_copies_ct_stem() -> None:
    model = make_model(TaskSpec("pet_cls", "classification", "pet"))

    assert torch.equal(
        model.get_parameter("stems.pet.conv.weight"), model.get_parameter("stems.ct.conv.weight")
    )


def test_model_dependency_copies_adapters_and_head() -> None:
    model = make_model(CT_SEG)
    with torch.no_grad():
        for parameter in model.adapters["ct_seg"].parameters():
            parameter.add_(torch.randn_like(parameter))
    child = TaskSpec("petct_seg", "segmentation", "petct", num_classes=2, depends_on="ct_seg")

    model.grow(child, seed=3)

    parent_adapters = model.adapters["ct_seg"].state_dict()
    for name, value in model.adapters["petct_seg"].state_dict().items():
        assert torch.equal(value, parent_adapters[name]), name
    parent_head = model.heads["ct_seg"].state_dict()
    child_head = model.heads["petct_seg"].state_dict()
    assert torch.equal(child_head["lateral.0.weight"], parent_head["lateral.0.weight"])
    assert torch.equal(child_head["blocks.2.2.weight"], parent_head["blocks.2.2.weight"])
    # The final layer has 2 classes instead of 3, so it keeps its own initialization.
    assert child_head["final.2.weight"].shape == (2, 8, 1, 1, 1)


def test_model_trainable_sets_counts() -> None:
    model = make_model(CT_CLS, CT_SEG)

    frozen_backbone = model.trainable_sets("ct_cls", finetune_shared=False)
    finetuned = model.trainable_sets("ct_cls", finetune_shared=True)

    assert count(model, frozen_backbone.new) == TINY_ADAPTERS + TINY_CLS_HEAD
    assert frozen_backbone.shared == []
    assert count(model, frozen_backbone.frozen) == (
        TINY_BACKBONE_AND_STEM + TINY_ADAPTERS + TINY_SEG_HEAD_3
    )
    assert count(model, finetuned.shared) == TINY_BACKBONE_AND_STEM
    assert count(model, finetuned.frozen) == TINY_ADAPTERS + TINY_SEG_HEAD_3
    assert "stems.ct.conv.weight" in finetuned.shared


def test_model_only_declared_parameters_get_gradients() -> None:
    model = make_model(CT_CLS, CT_SEG, PETCT_SEG)
    batch = {
        "image": torch.rand(2, 2, 16, 16, 16),
        "label": torch.randint(0, 3, (2, 1, 16, 16, 16)),
    }
    for finetune_shared in (False, True):
        model.zero_grad(set_to_none=True)
        sets = model.trainable_sets("petct_seg", finetune_shared=finetune_shared)
        model.set_trainable(sets.trainable)

        task_loss(PETCT_SEG, model(batch["image"], task="petct_seg"), batch).backward()

        with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
        assert with_grad == set(sets.trainable)
        # The petct stem is new for this task: with a frozen backbone it is still trained.
        assert "stems.petct.conv.weight" in sets.new
        assert ("backbone.down_layers.3.1.conv2.conv.weight" in with_grad) == finetune_shared


def test_model_earlier_task_bit_identical_after_new_task() -> None:
    model = make_model(CT_CLS)
    probe = torch.rand(3, 1, 16, 16, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        before_cls = model(probe, task="ct_cls").clone()

    model.grow(CT_SEG, seed=11)
    model.grow(PETCT_SEG, seed=12)
    for task, channels in (("ct_seg", 1), ("petct_seg", 2)):
        spec = model.task_spec(task)
        sets = model.trainable_sets(task, finetune_shared=False)
        model.set_trainable(sets.trainable)
        optimizer = torch.optim.Adam([model.get_parameter(name) for name in sets.trainable], 1e-2)
        task_probe = torch.rand(1, channels, 16, 16, 16)
        with torch.no_grad():
            before_task = model(task_probe, task=task)
        for _ in range(3):
            batch = {
                "image": torch.rand(2, channels, 16, 16, 16),
                "label": torch.randint(0, 3, (2, 1, 16, 16, 16)),
            }
            optimizer.zero_grad()
            task_loss(spec, model(batch["image"], task=task), batch).backward()
            optimizer.step()
        with torch.no_grad():
            assert not torch.equal(model(task_probe, task=task), before_task), task

    with torch.no_grad():
        after_cls = model(probe, task="ct_cls")
    assert torch.equal(before_cls, after_cls)


def test_model_seed_makes_growth_reproducible() -> None:
    first = make_model(CT_CLS)
    second = make_model(CT_CLS)

    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name


def test_model_ctfm_preset_matches_monai_encoder_size() -> None:
    config = BackboneConfig.preset("ctfm")
    model = UniconModel(config)
    reference = MonaiSegResEncoder(
        init_filters=32, blocks_down=(1, 2, 2, 4, 4), norm=("group", {"num_groups": 8})
    )

    total = sum(parameter.numel() for parameter in model.parameters())

    assert total == sum(parameter.numel() for parameter in reference.parameters())
    assert total == 77_760_992


def test_pooled_head_standardizes_input() -> None:
    """Pooled heads read (pooled - shift) / scale, with the backbone's buffers."""
    model = make_model(CT_CLS, CT_SEG)
    ct = torch.rand(2, 1, 16, 16, 16)
    width = 2 * sum(model.config.level_channels)
    assert torch.equal(model.backbone.pooled_shift, torch.zeros(width))
    assert torch.equal(model.backbone.pooled_scale, torch.ones(width))
    plain, segmentation = model(ct, task="ct_cls"), model(ct, task="ct_seg")

    shift, scale = torch.linspace(-1.0, 1.0, width), torch.linspace(0.5, 2.0, width)
    model.backbone.pooled_shift.copy_(shift)
    model.backbone.pooled_scale.copy_(scale)

    head = model.heads["ct_cls"]
    features = model.backbone(model.stems["ct"](ct), model.adapters["ct_cls"])
    pooled = torch.cat(
        [p for f in features for p in (f.relu().flatten(2).mean(2), f.relu().flatten(2).amax(2))],
        dim=1,
    )
    with torch.no_grad():
        expected = head.fc((pooled - shift) / scale)
        unshifted = head.fc(pooled)
    torch.testing.assert_close(model(ct, task="ct_cls"), expected)
    torch.testing.assert_close(plain, unshifted)
    assert not torch.allclose(expected, unshifted)
    # Segmentation heads do not read the statistics; both buffers are in the state dict.
    assert torch.equal(model(ct, task="ct_seg"), segmentation)
    assert {"backbone.pooled_shift", "backbone.pooled_scale"} <= set(model.state_dict())
    assert "backbone.pooled_shift" not in dict(model.named_parameters())
