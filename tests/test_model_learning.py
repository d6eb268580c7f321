"""Each head learns a small generated problem with the backbone frozen (16^3 volumes, CPU)."""

from __future__ import annotations

import torch
from torch import Tensor

from unicon_model import BackboneConfig, TaskSpec, UniconModel
from unicon_model.evaluation import evaluate_task
from unicon_model.losses import task_loss

torch.set_num_threads(1)

SIDE = 16


def sphere_mask(centers: Tensor, radii: Tensor) -> Tensor:
    """Boolean balls ``(N, 1, S, S, S)`` with the given voxel centres ``(N, 3)`` and radii ``(N,)``."""
    axis = torch.arange(SIDE, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"))  # (3, S, S, S)
    distance = (grid[None] - centers[:, :, None, None, None]).pow(2).sum(dim=1).sqrt()
    return (distance <= radii[:, None, None, None])[:, None]


def blob_images(num: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Noisy volumes with one bright ball each; returns images and the balls' masks."""
    centers = 4 + 8 * torch.rand(num, 3, generator=generator)
    radii = 2.0 + 2.0 * torch.rand(num, generator=generator)
    masks = sphere_mask(centers, radii)
    images = 0.2 * torch.rand(num, 1, SIDE, SIDE, SIDE, generator=generator) + 0.6 * masks
    return images, masks


def train(model: UniconModel, spec: TaskSpec, batches: list[dict[str, Tensor]], steps: int,
          lr: float) -> list[float]:
    model.grow(spec, seed=1)
    sets = model.trainable_sets(spec.name, finetune_shared=False)
    model.set_trainable(sets.trainable)
    optimizer = torch.optim.Adam([model.get_parameter(name) for name in sets.trainable], lr=lr)
    losses = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        optimizer.zero_grad()
        loss = task_loss(spec, model(batch["image"], task=spec.name), batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def split(data: dict[str, Tensor], batch_size: int) -> list[dict[str, Tensor]]:
    size = len(data["image"])
    return [
        {key: value[start : start + batch_size] for key, value in data.items()}
        for start in range(0, size, batch_size)
    ]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_model_classification_head_learns() -> None:
    generator = torch.Generator().manual_seed(0)
    images, _ = blob_images(96, generator)
    present = torch.rand(96, generator=generator) < 0.5
    background = 0.2 * torch.rand(images.shape, generator=generator)
    images = torch.where(present[:, None, None, None, None], images, background)
    data = {"image": images, "class": present.long()}
    model = UniconModel(BackboneConfig.preset("tiny"), seed=0)
    spec = TaskSpec("ct_cls", "classification", "ct")

    losses = train(model, spec, split({k: v[:64] for k, v in data.items()}, 8), steps=40, lr=1e-2)
    metrics = evaluate_task(model, spec, split({k: v[64:] for k, v in data.items()}, 16))

    assert mean(losses[-8:]) < 0.5 * mean(losses[:8])
    assert metrics["auc"].value is not None and metrics["auc"].value > 0.9
    assert metrics["accuracy"].value is not None and metrics["accuracy"].value > 0.8


def test_model_prognosis_head_learns() -> None:
    generator = torch.Generator().manual_seed(1)
    images, masks = blob_images(96, generator)
    present = torch.rand(96, generator=generator) < 0.5
    background = 0.2 * torch.rand(images.shape, generator=generator)
    images = torch.where(present[:, None, None, None, None], images, background)
    # A ball shortens survival, the more so the larger it is; times are noisy, 20% censored.
    volume = masks.flatten(1).float().sum(dim=1) / 100.0 * present
    noise = torch.exp(0.2 * torch.randn(96, generator=generator))
    times = 500.0 * torch.exp(-volume) * noise
    events = (torch.rand(96, generator=generator) < 0.8).float()
    data = {"image": images, "time": times, "event": events}
    model = UniconModel(BackboneConfig.preset("tiny"), seed=0)
    spec = TaskSpec("ct_prog", "prognosis", "ct", time_bins=(150.0, 300.0, 450.0))

    losses = train(model, spec, split({k: v[:64] for k, v in data.items()}, 8), steps=40, lr=1e-2)
    metrics = evaluate_task(model, spec, split({k: v[64:] for k, v in data.items()}, 16))

    assert mean(losses[-8:]) < 0.75 * mean(losses[:8])
    assert metrics["c_index"].value is not None and metrics["c_index"].value > 0.7


def test_model_segmentation_head_learns() -> None:
    generator = torch.Generator().manual_seed(2)
    images, masks = blob_images(40, generator)
    data = {"image": images, "label": masks.long()}
    model = UniconModel(BackboneConfig.preset("tiny"), seed=0)
    spec = TaskSpec("ct_seg", "segmentation", "ct")

    losses = train(model, spec, split({k: v[:32] for k, v in data.items()}, 4), steps=80, lr=1e-2)
    metrics = evaluate_task(model, spec, split({k: v[32:] for k, v in data.items()}, 4))

    assert mean(losses[-8:]) < 0.5 * mean(losses[:8])
    assert metrics["dice"].value is not None and metrics["dice"].value > 0.8
    assert metrics["dice_class_1"] == metrics["dice"]
