"""EWC, L2-SP and LwF penalties, the diagonal Fisher and the merge of Fishers."""

from __future__ import annotations

import copy

import pytest
import torch

from unicon_model import BackboneConfig, TaskSpec, UniconModel
from unicon_model.consolidation import (
    EWC,
    L2SP,
    ConsolidationError,
    LwF,
    NoConsolidation,
    build_consolidation,
    diagonal_fisher,
    merge_fishers,
    snapshot,
)
from unicon_model.losses import task_loss

torch.set_num_threads(1)

CT_CLS = TaskSpec("ct_cls", "classification", "ct")
CT_PROG = TaskSpec("ct_prog", "prognosis", "ct", time_bins=(100.0, 300.0))
CT_SEG = TaskSpec("ct_seg", "segmentation", "ct")
PETCT_SEG = TaskSpec("petct_seg", "segmentation", "petct", depends_on="ct_seg")
NORM_BIAS = "backbone.down_layers.1.1.norm1.bias"  # 16 entries
STEM = "stems.ct.conv.weight"


def make_model() -> UniconModel:
    model = UniconModel(BackboneConfig.preset("tiny"), seed=0)
    for index, task in enumerate((CT_CLS, CT_PROG, CT_SEG, PETCT_SEG)):
        model.grow(task, seed=index + 1)
    return model


def shift(model: UniconModel, name: str, amount: float) -> None:
    with torch.no_grad():
        model.get_parameter(name).add_(amount)


def test_consolidation_ewc_zero_at_reference_then_quadratic() -> None:
    model = make_model()
    names = [NORM_BIAS, STEM]
    fisher = {NORM_BIAS: torch.full((16,), 2.0), STEM: torch.full((8, 1, 3, 3, 3), 0.5)}
    ewc = EWC(fisher, snapshot(model, names), weight=3.0)
    images = torch.zeros(1)

    at_reference = ewc.penalty(model, images)
    shift(model, NORM_BIAS, 0.1)
    once = ewc.penalty(model, images)
    shift(model, NORM_BIAS, 0.1)
    twice = ewc.penalty(model, images)

    assert at_reference.item() == 0.0
    # 3.0 / 2 * 16 entries * Fisher 2.0 * 0.1^2
    assert once.item() == pytest.approx(0.48, rel=1e-5)
    assert twice.item() == pytest.approx(4 * 0.48, rel=1e-5)


def test_consolidation_ewc_rejects_shape_mismatch() -> None:
    model = make_model()

    with pytest.raises(ConsolidationError, match="shape"):
        EWC({NORM_BIAS: torch.ones(3)}, snapshot(model, [NORM_BIAS]), weight=1.0)


def test_consolidation_l2sp_zero_at_reference_then_quadratic() -> None:
    model = make_model()
    l2sp = L2SP(snapshot(model, [NORM_BIAS, STEM]), weight=0.5)
    images = torch.zeros(1)

    at_reference = l2sp.penalty(model, images)
    shift(model, STEM, -0.2)
    moved = l2sp.penalty(model, images)

    assert at_reference.item() == 0.0
    # 0.5 / 2 * 216 entries * 0.2^2
    assert moved.item() == pytest.approx(0.25 * 216 * 0.04, rel=1e-5)


def test_consolidation_lwf_zero_for_teacher_then_positive() -> None:
    model = make_model()
    lwf = LwF(copy.deepcopy(model), ["ct_cls", "ct_prog", "ct_seg"], temperature=2.0,
              weight=1.0, modality="ct")
    images = torch.rand(2, 1, 16, 16, 16)

    at_teacher = lwf.penalty(model, images)
    with torch.no_grad():
        for name in ("backbone.down_layers.3.1.conv2.conv.weight",
                     "backbone.down_layers.0.1.conv1.conv.weight"):
            parameter = model.get_parameter(name)
            parameter.add_(0.5 * torch.randn_like(parameter))
    moved = lwf.penalty(model, images)

    assert at_teacher.item() == 0.0
    assert moved.item() > 1e-4


def test_consolidation_lwf_distills_ct_tasks_from_petct_images() -> None:
    model = make_model()
    lwf = build_consolidation("lwf", model, "petct_seg", weight=1.0)
    images = torch.rand(2, 2, 16, 16, 16)

    assert isinstance(lwf, LwF)
    assert [task.name for task in lwf.tasks] == ["ct_cls", "ct_prog", "ct_seg"]
    assert lwf.penalty(model, images).item() == 0.0

    shift(model, NORM_BIAS, 0.3)
    single_task = LwF(copy.deepcopy(model), ["ct_seg"], modality="petct")
    shift(model, NORM_BIAS, 0.3)
    penalty = single_task.penalty(model, images)
    penalty.backward()

    assert penalty.item() > 0.0
    assert model.get_parameter(NORM_BIAS).grad is not None


def test_consolidation_l2sp_gradient_on_shared() -> None:
    model = make_model()
    model.set_trainable(model.trainable_sets("ct_seg", finetune_shared=True).trainable)
    l2sp = build_consolidation("l2sp", model, "ct_seg", weight=1.0)
    shift(model, NORM_BIAS, 0.1)

    l2sp.penalty(model, torch.zeros(1)).backward()

    gradient = model.get_parameter(NORM_BIAS).grad
    assert gradient is not None
    torch.testing.assert_close(gradient, torch.full((16,), 0.1))  # d/dθ 1/2 (θ - θ*)^2


def test_consolidation_none_is_zero() -> None:
    penalty = NoConsolidation().penalty(make_model(), torch.zeros(1))

    assert penalty.item() == 0.0


def test_consolidation_diagonal_fisher_matches_backward() -> None:
    model = make_model()
    names = [NORM_BIAS, STEM]
    generator = torch.Generator().manual_seed(0)
    batches = [
        {"image": torch.rand(2, 1, 16, 16, 16, generator=generator),
         "class": torch.tensor([0, 1])}
        for _ in range(3)
    ]
    model.set_trainable(model.trainable_sets("ct_cls").trainable)

    fisher = diagonal_fisher(model, "ct_cls", batches, names)

    reference = copy.deepcopy(model)
    reference.set_trainable(names)
    expected = {name: torch.zeros_like(reference.get_parameter(name)) for name in names}
    for batch in batches:
        reference.zero_grad()
        task_loss(CT_CLS, reference(batch["image"], task="ct_cls"), batch).backward()
        for name in names:
            gradient = reference.get_parameter(name).grad
            assert gradient is not None
            expected[name] += gradient.pow(2) / len(batches)
    for name in names:
        torch.testing.assert_close(fisher[name], expected[name], rtol=1e-5, atol=1e-12)
        assert fisher[name].abs().sum() > 0
    # The requires_grad flags of the model are restored.
    assert not model.get_parameter(NORM_BIAS).requires_grad


def test_consolidation_merge_fishers_weighted_by_samples() -> None:
    first = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    second = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([4.0])}

    merged = merge_fishers([(first, 10), (second, 30)])

    torch.testing.assert_close(merged["w"], torch.tensor([2.5, 5.0]))  # (10*1 + 30*3) / 40
    torch.testing.assert_close(merged["b"], torch.tensor([3.0]))


def test_consolidation_merge_fishers_rejects_mismatch() -> None:
    with pytest.raises(ConsolidationError, match="different parameters"):
        merge_fishers([({"w": torch.ones(2)}, 1), ({"v": torch.ones(2)}, 1)])
    with pytest.raises(ConsolidationError, match="sum to zero"):
        merge_fishers([({"w": torch.ones(2)}, 0)])


def test_consolidation_build_by_name() -> None:
    model = make_model()
    fisher = {NORM_BIAS: torch.ones(16)}

    ewc = build_consolidation("ewc", model, "ct_seg", fisher=fisher, weight=2.0)
    l2sp = build_consolidation("l2sp", model, "ct_seg")

    assert isinstance(ewc, EWC) and ewc.weight == 2.0
    assert isinstance(l2sp, L2SP)
    assert set(l2sp.reference) == set(model.trainable_sets("ct_seg", True).shared)
    assert isinstance(build_consolidation("none", model, "ct_seg"), NoConsolidation)
    with pytest.raises(ConsolidationError, match="needs a Fisher"):
        build_consolidation("ewc", model, "ct_seg")
    with pytest.raises(ConsolidationError, match="Did you mean 'ewc'"):
        build_consolidation("ewk", model, "ct_seg")
