"""Task losses against hand computations and the evaluation entry point."""

from __future__ import annotations

import math

import pytest
import torch

from unicon_model import BackboneConfig, TaskSpec, UniconModel
from unicon_model.evaluation import evaluate_task
from unicon_model.losses import (
    BatchError,
    cox_nll,
    discrete_hazard_nll,
    interval_index,
    risk_score,
    task_loss,
)

torch.set_num_threads(1)


def log_sigmoid(value: float) -> float:
    return -math.log1p(math.exp(-value))


def test_losses_interval_index_edges() -> None:
    times = torch.tensor([0.5, 100.0, 150.0, 200.0, 999.0])

    assert interval_index(times, (100.0, 200.0)).tolist() == [0, 1, 1, 2, 2]


def test_losses_discrete_hazard_by_hand() -> None:
    logits = torch.tensor([[0.2, -0.4, 1.0], [0.3, 0.1, -0.5]])
    times = torch.tensor([150.0, 250.0])  # intervals 1 and 2 with edges (100, 200)
    events = torch.tensor([1.0, 0.0])

    loss = discrete_hazard_nll(logits, times, events, (100.0, 200.0))

    # Patient 0: survived interval 0, event in interval 1.
    first = -(log_sigmoid(-0.2) + log_sigmoid(-0.4))
    # Patient 1: censored in interval 2, survived intervals 0 and 1.
    second = -(log_sigmoid(-0.3) + log_sigmoid(-0.1))
    assert loss.item() == pytest.approx((first + second) / 2, rel=1e-6)


def test_losses_cox_matches_loop() -> None:
    risk = torch.tensor([0.5, -0.2, 1.3, 0.0])
    times = torch.tensor([5.0, 8.0, 5.0, 2.0])
    events = torch.tensor([1.0, 0.0, 1.0, 1.0])

    loss = cox_nll(risk, times, events)

    total = 0.0
    for i in range(4):
        if events[i] == 1:
            at_risk = [j for j in range(4) if times[j] >= times[i]]
            total += risk[i].item() - math.log(sum(math.exp(risk[j].item()) for j in at_risk))
    assert loss.item() == pytest.approx(-total / 3, rel=1e-6)
    assert cox_nll(risk, times, torch.zeros(4)).item() == 0.0


def test_losses_risk_score_orders_hazards() -> None:
    spec = TaskSpec("ct_prog", "prognosis", "ct", time_bins=(100.0,))
    low, high = torch.tensor([[-3.0, -3.0]]), torch.tensor([[2.0, 2.0]])

    assert risk_score(spec, high).item() > risk_score(spec, low).item()


def test_losses_missing_batch_key_named() -> None:
    spec = TaskSpec("ct_cls", "classification", "ct")

    with pytest.raises(BatchError, match=r"needs batch key 'class'.*\['image', 'label'\]"):
        task_loss(spec, torch.zeros(2, 2), {"image": torch.zeros(1), "label": torch.zeros(1)})


def test_losses_segmentation_loss_zero_for_confident_truth() -> None:
    spec = TaskSpec("ct_seg", "segmentation", "ct")
    label = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    label[..., :2] = 1
    logits = torch.cat([(label == 0).float(), (label == 1).float()], dim=1) * 40.0

    assert task_loss(spec, logits, {"label": label}).item() < 1e-4


def test_losses_evaluate_whole_volume_sliding_window() -> None:
    model = UniconModel(BackboneConfig.preset("tiny"), seed=0)
    spec = TaskSpec("ct_seg", "segmentation", "ct")
    model.grow(spec, seed=1)
    image = torch.rand(1, 1, 20, 24, 18)  # sides not divisible by 8
    label = (image > 0.5).long()
    loader = [{"image": image, "label": label}]

    windowed = evaluate_task(model, spec, loader, roi_size=(16, 16, 16))
    padded = evaluate_task(model, spec, loader)

    assert set(windowed) == set(padded) == {"dice", "dice_class_1"}
    assert windowed["dice"].value is not None
    assert padded["dice"].value is not None
    assert model.training
