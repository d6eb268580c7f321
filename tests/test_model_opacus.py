"""The model under Opacus: per-sample gradients for adapters and heads with a frozen backbone."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from unicon_model import BackboneConfig, TaskSpec, UniconModel
from unicon_model.consolidation import L2SP, snapshot
from unicon_model.losses import task_loss

torch.set_num_threads(1)

CT_CLS = TaskSpec("ct_cls", "classification", "ct")
PETCT_SEG = TaskSpec("petct_seg", "segmentation", "petct")


def make_model() -> UniconModel:
    model = UniconModel(BackboneConfig.preset("tiny"), seed=0)
    model.grow(CT_CLS, seed=1)
    model.grow(PETCT_SEG, seed=2)
    # Non-zero up-projections so that every adapter parameter gets a non-zero gradient.
    with torch.no_grad():
        for parameter in model.adapters.parameters():
            parameter.normal_(0.0, 0.05)
    return model


def test_model_passes_opacus_validator() -> None:
    assert ModuleValidator.validate(make_model(), strict=False) == []


# The stem's input needs no gradient, which makes torch warn about Opacus's full backward hook.
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("spec", [CT_CLS, PETCT_SEG], ids=lambda spec: spec.name)
def test_model_per_sample_gradients_with_frozen_backbone(spec: TaskSpec) -> None:
    model = make_model()
    sets = model.trainable_sets(spec.name, finetune_shared=False)
    model.set_trainable(sets.trainable)
    batch_size = 3
    images = torch.rand(batch_size, spec.in_channels, 16, 16, 16)
    batch = {
        "image": images,
        "class": torch.tensor([0, 1, 1]),
        "label": torch.randint(0, 2, (batch_size, 1, 16, 16, 16)),
    }
    frozen_before = {name: model.get_parameter(name).clone() for name in sets.frozen[:5]}
    private = GradSampleModule(model)

    task_loss(spec, private(images, task=spec.name), batch).backward()

    parameters = dict(model.named_parameters())
    for name in sets.trainable:
        grad_sample = getattr(parameters[name], "grad_sample", None)
        assert grad_sample is not None, name
        assert grad_sample.shape == (batch_size, *parameters[name].shape), name
        # The loss is a batch mean, so the batch gradient is the mean of per-sample gradients.
        torch.testing.assert_close(grad_sample.mean(dim=0), parameters[name].grad,
                                   rtol=1e-4, atol=1e-6)
    assert any(name.startswith(f"adapters.{spec.name}.") for name in sets.trainable)
    for name in sets.frozen:
        assert getattr(parameters[name], "grad_sample", None) is None, name
        assert parameters[name].grad is None, name
    for name, value in frozen_before.items():
        assert torch.equal(model.get_parameter(name), value)


def test_model_penalty_reads_wrapped_parameter_names() -> None:
    model = make_model()
    names = model.trainable_sets("ct_cls", finetune_shared=True).shared
    penalty = L2SP(snapshot(model, names), weight=2.0)
    with torch.no_grad():
        model.get_parameter("backbone.down_layers.0.1.norm1.bias").add_(0.5)
    private = GradSampleModule(model)

    value = penalty.penalty(private, torch.zeros(1))

    # 8 entries moved by 0.5: 2.0 / 2 * 8 * 0.25.
    torch.testing.assert_close(value, torch.tensor(2.0))
