"""Tests of DP-SGD at a site: configuration, accounting, the privacy ledger, Opacus glue."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.nn import functional
from torch.utils.data import DataLoader, Dataset, TensorDataset

from client.privacy import (
    DPConfig,
    OpacusIncompatibleError,
    PrivacyBudgetError,
    PrivacyConfigError,
    PrivacyLedger,
    PrivacyLedgerError,
    attach_dp,
    check_opacus_compatible,
    choose_noise_multiplier,
    compute_epsilon,
    is_empty_batch,
    opacus_incompatibilities,
    plain_state_dict,
    plan_private_round,
    poisson_sample_rate,
    private_step,
    step_on_empty_batch,
    unwrap_dp_model,
)

torch.set_num_threads(1)

# Opacus warns when the best RDP order sits at the end of its range, but the bound stays
# valid. Torch warns that backward hooks fire without input gradients, as expected here.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Optimal order is the"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
]

SOURCE = Path("sites/hospital-a.yaml")


def dp_config(**dp: Any) -> DPConfig:
    config = DPConfig.from_mapping({"dp": dp}, SOURCE)
    assert config is not None
    return config


# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------


def test_dpconfig_target_epsilon_parsed() -> None:
    config = dp_config(enabled=True, max_grad_norm=0.5, delta=1.0e-5, target_epsilon=8.0)

    assert config.max_grad_norm == 0.5
    assert config.delta == 1.0e-5
    assert config.target_epsilon == 8.0
    assert config.noise_multiplier is None
    assert config.budget == 8.0
    assert config.source == SOURCE


def test_dpconfig_noise_multiplier_with_budget() -> None:
    config = dp_config(delta=1.0e-5, noise_multiplier=1.1, epsilon_budget=10.0)

    assert config.noise_multiplier == 1.1
    assert config.max_grad_norm == 1.0
    assert config.budget == 10.0


def test_dpconfig_noise_multiplier_without_budget_is_uncapped() -> None:
    config = dp_config(delta=1.0e-5, noise_multiplier=1.1)

    assert config.budget is None


@pytest.mark.parametrize(
    "mapping",
    [None, {}, {"dp": None}, {"dp": {"enabled": False, "delta": 1.0e-5}}],
)
def test_dpconfig_absent_or_disabled_is_none(mapping: dict[str, Any] | None) -> None:
    assert DPConfig.from_mapping(mapping, SOURCE) is None


def test_dpconfig_unknown_key_suggests_closest() -> None:
    with pytest.raises(PrivacyConfigError) as caught:
        DPConfig.from_mapping({"dp": {"delta": 1.0e-5, "max_grad_nrom": 1.0}}, SOURCE)

    message = str(caught.value)
    assert str(SOURCE) in message
    assert "privacy.dp.max_grad_nrom" in message
    assert "Did you mean 'max_grad_norm'?" in message


def test_dpconfig_unknown_privacy_key_rejected() -> None:
    with pytest.raises(PrivacyConfigError, match=r"unknown key 'privacy.dpp'.*Did you mean 'dp'"):
        DPConfig.from_mapping({"dpp": {}}, SOURCE)


@pytest.mark.parametrize(
    ("dp", "expected"),
    [
        ({"delta": "1e-5", "target_epsilon": 8.0}, r"delta.*string '1e-5'.*1\.0e-5"),
        ({"delta": 1.5, "target_epsilon": 8.0}, r"delta.*below 1, found 1\.5"),
        ({"delta": 0.0, "target_epsilon": 8.0}, r"delta.*above 0, found 0\.0"),
        ({"target_epsilon": 8.0}, r"privacy\.dp\.delta' is missing"),
        ({"delta": 1.0e-5, "target_epsilon": -1.0}, r"target_epsilon.*above 0, found -1\.0"),
        ({"delta": 1.0e-5, "target_epsilon": math.inf}, r"target_epsilon.*finite"),
        ({"delta": 1.0e-5, "max_grad_norm": True, "noise_multiplier": 1.0}, r"max_grad_norm.*bool"),
        ({"delta": 1.0e-5}, r"neither 'target_epsilon' nor 'noise_multiplier'"),
        ({"delta": 1.0e-5, "target_epsilon": 8.0, "noise_multiplier": 1.0}, r"both"),
        ({"delta": 1.0e-5, "target_epsilon": 8.0, "epsilon_budget": 9.0}, r"epsilon_budget"),
        ({"enabled": "yes", "delta": 1.0e-5, "target_epsilon": 8.0}, r"enabled.*true or false"),
    ],
)
def test_dpconfig_invalid_value_rejected(dp: dict[str, Any], expected: str) -> None:
    with pytest.raises(PrivacyConfigError, match=expected) as caught:
        DPConfig.from_mapping({"dp": dp}, SOURCE)

    assert str(SOURCE) in str(caught.value)
    assert "Fix:" in str(caught.value)


def test_dpconfig_delta_not_below_one_over_n_rejected() -> None:
    config = dp_config(delta=1.0e-5, target_epsilon=8.0)

    config.check_delta(99_999, "ct_cls")
    with pytest.raises(PrivacyConfigError) as caught:
        config.check_delta(100_000, "ct_cls")

    message = str(caught.value)
    assert "set delta below 1/N = 1e-05" in message
    assert "1/100000" in message
    assert "1e-06" in message


# ---------------------------------------------------------------------------------------
# Accounting
# ---------------------------------------------------------------------------------------


def test_compute_epsilon_matches_rdp_accountant() -> None:
    reference = RDPAccountant()
    for _ in range(7):
        reference.step(noise_multiplier=1.3, sample_rate=0.25)
    for _ in range(5):
        reference.step(noise_multiplier=0.9, sample_rate=0.1)

    epsilon = compute_epsilon([(1.3, 0.25, 7), (0.9, 0.1, 5)], delta=1.0e-5)

    assert epsilon == reference.get_epsilon(delta=1.0e-5)
    assert compute_epsilon([], delta=1.0e-5) == 0.0


def test_compute_epsilon_zero_noise_is_infinite() -> None:
    assert math.isinf(compute_epsilon([(0.0, 0.5, 3)], delta=1.0e-5))


def test_poisson_sample_rate_matches_loader_length() -> None:
    assert poisson_sample_rate(10, 4) == 1.0 / 3.0
    assert poisson_sample_rate(8, 4) == 0.5
    assert poisson_sample_rate(3, 8) == 1.0


def test_choose_noise_multiplier_fresh_equals_opacus() -> None:
    sigma = choose_noise_multiplier(4.0, 1.0e-5, 0.1, 50)

    expected = get_noise_multiplier(
        target_epsilon=4.0, target_delta=1.0e-5, sample_rate=0.1, steps=50, accountant="rdp"
    )
    assert sigma == expected
    assert compute_epsilon([(sigma, 0.1, 50)], 1.0e-5) <= 4.0


def test_choose_noise_multiplier_with_history_ends_at_target() -> None:
    history = [(1.0, 0.1, 20)]
    spent = compute_epsilon(history, 1.0e-5)
    assert spent < 6.0

    sigma = choose_noise_multiplier(6.0, 1.0e-5, 0.2, 30, history)

    total = compute_epsilon([*history, (sigma, 0.2, 30)], 1.0e-5)
    assert total <= 6.0
    assert total > 6.0 - 0.02


def test_choose_noise_multiplier_spent_budget_raises() -> None:
    history = [(0.8, 0.5, 100)]
    spent = compute_epsilon(history, 1.0e-5)

    with pytest.raises(PrivacyBudgetError, match="already"):
        choose_noise_multiplier(spent * 0.5, 1.0e-5, 0.5, 10, history)


# ---------------------------------------------------------------------------------------
# Ledger
# ---------------------------------------------------------------------------------------


def record(ledger: PrivacyLedger, task: str, server_round: int, **values: Any) -> None:
    arguments: dict[str, Any] = {
        "steps": 10,
        "sample_rate": 0.25,
        "noise_multiplier": 1.1,
        "delta": 1.0e-5,
    }
    arguments.update(values)
    ledger.record_round(task, run_id="run-1", stage=task, server_round=server_round, **arguments)


def test_ledger_persists_across_reopen(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path)
    record(ledger, "ct_cls", 1)
    record(ledger, "ct_cls", 2, steps=4)
    record(ledger, "ct_seg", 1, noise_multiplier=2.0)

    reopened = PrivacyLedger.open(tmp_path)

    assert reopened.tasks() == ["ct_cls", "ct_seg"]
    assert reopened.history("ct_cls") == [(1.1, 0.25, 10), (1.1, 0.25, 4)]
    assert reopened.total_steps("ct_cls") == 14
    assert [entry.server_round for entry in reopened.entries("ct_cls")] == [1, 2]
    expected = compute_epsilon([(1.1, 0.25, 14)], 1.0e-5)
    assert reopened.epsilon_spent("ct_cls", 1.0e-5) == pytest.approx(expected, rel=1e-12)
    assert reopened.entries("ct_cls")[-1].epsilon_after == pytest.approx(expected, rel=1e-12)

    document = json.loads((tmp_path / "privacy_ledger.json").read_text())
    assert len(document["tasks"]["ct_cls"]["entries"]) == 2
    assert document["tasks"]["ct_seg"]["entries"][0]["noise_multiplier"] == 2.0
    assert not list(tmp_path.glob("*.tmp"))


def test_ledger_epsilon_grows_with_each_round(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path)
    epsilons = []
    for server_round in range(1, 4):
        record(ledger, "ct_cls", server_round)
        epsilons.append(ledger.entries("ct_cls")[-1].epsilon_after)

    assert epsilons[0] < epsilons[1] < epsilons[2]


def test_ledger_budget_declines_round_after_reopen(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path)
    one_round = compute_epsilon([(1.1, 0.25, 10)], 1.0e-5)
    budget = one_round * 1.2
    first = ledger.plan_round("ct_cls", 10, 0.25, 1.1, 1.0e-5, epsilon_budget=budget)
    assert first.allowed
    assert first.reason is None
    assert first.epsilon_before == 0.0
    record(ledger, "ct_cls", 1)

    later_run = PrivacyLedger.open(tmp_path)
    second = later_run.plan_round("ct_cls", 10, 0.25, 1.1, 1.0e-5, epsilon_budget=budget)

    assert not second.allowed
    assert second.reason is not None
    assert "above its budget" in second.reason
    assert second.epsilon_before == pytest.approx(one_round, rel=1e-12)
    assert second.epsilon_after > budget


def test_ledger_two_handles_keep_both_rounds(tmp_path: Path) -> None:
    first = PrivacyLedger.open(tmp_path)
    second = PrivacyLedger.open(tmp_path)

    record(first, "ct_cls", 1)
    record(second, "ct_cls", 2)

    assert PrivacyLedger.open(tmp_path).total_steps("ct_cls") == 20
    assert first.total_steps("ct_cls") == 20


def test_ledger_larger_delta_cannot_lower_epsilon(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path)
    record(ledger, "ct_cls", 1, delta=1.0e-6)

    plan = ledger.plan_round("ct_cls", 1, 0.25, 1.1, 1.0e-2)
    with pytest.raises(PrivacyLedgerError, match="would lower the epsilon"):
        record(ledger, "ct_cls", 2, steps=1, delta=1.0e-2)

    assert not plan.allowed
    assert plan.reason is not None
    assert "Keep delta at or below" in plan.reason
    assert ledger.total_steps("ct_cls") == 10


def test_ledger_zero_noise_declined(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path)

    plan = ledger.plan_round("ct_cls", 5, 0.25, 0.0, 1.0e-5, epsilon_budget=100.0)

    assert not plan.allowed
    assert math.isinf(plan.epsilon_after)
    assert plan.reason is not None
    assert "cannot be computed" in plan.reason
    with pytest.raises(ValueError, match="not private"):
        record(ledger, "ct_cls", 1, noise_multiplier=0.0)


def test_ledger_corrupt_file_raises(tmp_path: Path) -> None:
    (tmp_path / "privacy_ledger.json").write_text("{ not json")

    with pytest.raises(PrivacyLedgerError, match="Do not delete it"):
        PrivacyLedger.open(tmp_path)


def test_ledger_tampered_entry_raises(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path)
    record(ledger, "ct_cls", 1)
    path = tmp_path / "privacy_ledger.json"
    document = json.loads(path.read_text())
    document["tasks"]["ct_cls"]["entries"][0]["steps"] = "ten"
    path.write_text(json.dumps(document))

    with pytest.raises(PrivacyLedgerError, match=r"entries\[0\]\.steps"):
        PrivacyLedger.open(tmp_path)


def test_plan_private_round_target_epsilon_spends_budget(tmp_path: Path) -> None:
    config = dp_config(delta=1.0e-5, target_epsilon=3.0)
    ledger = PrivacyLedger.open(tmp_path)
    sizes = {"num_samples": 40, "batch_size": 10, "steps_per_round": 4, "num_rounds": 3}

    sigmas = []
    for server_round in range(1, 4):
        plan = plan_private_round(
            PrivacyLedger.open(tmp_path), config, task="ct_cls", run_id="run-1", stage="ct_cls",
            **sizes,
        )  # fmt: skip
        assert plan.allowed, plan.reason
        assert plan.sample_rate == 0.25
        assert plan.steps == 4
        sigmas.append(plan.noise_multiplier)
        ledger.record_round(
            "ct_cls",
            run_id="run-1",
            stage="ct_cls",
            server_round=server_round,
            steps=plan.steps,
            sample_rate=plan.sample_rate,
            noise_multiplier=plan.noise_multiplier,
            delta=config.delta,
        )

    expected_sigma = get_noise_multiplier(
        target_epsilon=3.0, target_delta=1.0e-5, sample_rate=0.25, steps=12, accountant="rdp"
    )
    assert sigmas == [expected_sigma] * 3
    spent = ledger.epsilon_spent("ct_cls", 1.0e-5)
    assert 3.0 - 0.02 < spent <= 3.0

    next_stage = plan_private_round(
        PrivacyLedger.open(tmp_path), config, task="ct_cls", run_id="run-2", stage="ct_cls",
        **sizes,
    )  # fmt: skip
    assert not next_stage.allowed
    assert next_stage.reason is not None
    assert "no privacy budget left" in next_stage.reason


def test_plan_private_round_large_delta_raises(tmp_path: Path) -> None:
    config = dp_config(delta=0.1, noise_multiplier=1.0)

    with pytest.raises(PrivacyConfigError, match=r"set delta below 1/N = 0\.0833"):
        plan_private_round(
            PrivacyLedger.open(tmp_path), config, task="ct_cls", run_id="r", stage="ct_cls",
            num_samples=12, batch_size=4, steps_per_round=3, num_rounds=2,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------
# Opacus glue
# ---------------------------------------------------------------------------------------


class TinyCases(Dataset[dict[str, torch.Tensor]]):
    """Cases in the layout of ``client.preprocess``: an image and a class, 16^3 voxels."""

    def __init__(self, count: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand((count, 1, 16, 16, 16), generator=generator)
        self.classes = torch.arange(count) % 2

    def __len__(self) -> int:
        return len(self.classes)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[index], "class": self.classes[index]}


class TinyNet(nn.Module):
    """A frozen Conv3d backbone and a trainable head with GroupNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(
            nn.Conv3d(4, 4, 1),
            nn.GroupNorm(2, 4),
            nn.ReLU(),
            nn.AdaptiveAvgPool3d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(4, 2)
        for parameter in self.backbone.parameters():
            parameter.requires_grad_(False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Map images ``(B, 1, D, H, W)`` to class logits ``(B, 2)``."""
        return self.classifier(self.head(self.backbone(image)))


def private_setup(
    count: int, batch_size: int, noise_multiplier: float = 1.0
) -> tuple[nn.Module, Any, DPDataLoader, TinyNet]:
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loader = DataLoader(TinyCases(count), batch_size=batch_size)
    config = dp_config(delta=1.0e-5, noise_multiplier=noise_multiplier, max_grad_norm=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private = attach_dp(model, optimizer, loader, config, noise_multiplier)
    return (*private, model)


def train_steps(model: nn.Module, optimizer: Any, loader: DataLoader[Any], steps: int) -> int:
    """Run ``steps`` DP-SGD steps and return how many batches were empty."""
    empty = 0
    steps_taken = 0
    while steps_taken < steps:
        for batch in loader:
            optimizer.zero_grad()
            if is_empty_batch(batch):
                step_on_empty_batch(optimizer)
                empty += 1
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    loss = functional.cross_entropy(model(batch["image"]), batch["class"])
                    loss.backward()
                private_step(optimizer)
            steps_taken += 1
            if steps_taken == steps:
                break
    return empty


def test_check_opacus_compatible_names_modules() -> None:
    model = nn.Sequential(
        nn.Conv3d(1, 2, 3),
        nn.BatchNorm3d(2),
        nn.ReLU(inplace=True),
        nn.Conv3d(2, 2, 1),
        nn.GroupNorm(1, 2),
    )

    assert check_opacus_compatible(model) == ["1", "2"]
    reasons = opacus_incompatibilities(model)
    assert "GroupNorm" in reasons["1"]
    assert "inplace=True" in reasons["2"]

    model.eval()
    assert check_opacus_compatible(model) == ["(model)", "1", "2"]


def test_check_opacus_compatible_frozen_eval_batchnorm_accepted() -> None:
    model = nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2), nn.Conv3d(2, 2, 1))
    for parameter in [*model[0].parameters(), *model[1].parameters()]:
        parameter.requires_grad_(False)
    model[1].eval()

    assert check_opacus_compatible(model) == []
    assert check_opacus_compatible(TinyNet()) == []


def test_attach_dp_rejects_incompatible_model() -> None:
    model = nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TinyCases(4), batch_size=2)

    with pytest.raises(OpacusIncompatibleError, match=r"1: BatchNorm3d mixes the samples"):
        attach_dp(model, optimizer, loader, dp_config(delta=1.0e-5, noise_multiplier=1.0), 1.0)


def test_attach_dp_rejects_frozen_parameter_in_optimizer() -> None:
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TinyCases(4), batch_size=2)

    with pytest.raises(OpacusIncompatibleError, match=r"frozen parameters \(backbone\.0\.weight"):
        attach_dp(model, optimizer, loader, dp_config(delta=1.0e-5, noise_multiplier=1.0), 1.0)


def test_attach_dp_training_keeps_frozen_and_matches_accountant(tmp_path: Path) -> None:
    private_model, optimizer, loader, model = private_setup(count=8, batch_size=2)
    state = model.state_dict()
    frozen_before = {k: v.clone() for k, v in state.items() if k.startswith("backbone")}
    head_before = model.classifier.weight.detach().clone()
    steps = 6

    train_steps(private_model, optimizer, loader, steps)
    ledger = PrivacyLedger.open(tmp_path)
    ledger.record_round(
        "ct_cls",
        run_id="run-1",
        stage="ct_cls",
        server_round=1,
        steps=steps,
        sample_rate=loader.sample_rate,
        noise_multiplier=1.0,
        delta=1.0e-5,
    )

    for name, before in frozen_before.items():
        after = model.state_dict()[name]
        assert after.numpy().tobytes() == before.numpy().tobytes(), name
    assert not torch.equal(model.classifier.weight, head_before)

    assert loader.sample_rate == poisson_sample_rate(8, 2) == 0.25
    reference = RDPAccountant()
    for _ in range(steps):
        reference.step(noise_multiplier=1.0, sample_rate=0.25)
    assert ledger.epsilon_spent("ct_cls", 1.0e-5) == reference.get_epsilon(delta=1.0e-5)
    reopened = PrivacyLedger.open(tmp_path)
    assert reopened.epsilon_spent("ct_cls", 1.0e-5) == reference.get_epsilon(delta=1.0e-5)


def test_plain_state_dict_strips_module_prefix() -> None:
    private_model, _, _, model = private_setup(count=4, batch_size=2)
    expected = model.state_dict()
    assert all(key.startswith("_module.") for key in private_model.state_dict())

    state = plain_state_dict(private_model)

    assert list(state) == list(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    assert unwrap_dp_model(private_model) is model
    assert not hasattr(model.classifier.weight, "grad_sample")


def test_empty_first_batch_collates_and_steps_without_nan() -> None:
    _, optimizer, loader, model = private_setup(count=4, batch_size=2)
    before = model.classifier.weight.detach().clone()

    batch = loader.collate_fn([])
    optimizer.zero_grad()
    step_on_empty_batch(optimizer)

    assert is_empty_batch(batch)
    assert tuple(batch["image"].shape) == (0, 1, 16, 16, 16)
    assert batch["class"].dtype == torch.int64
    assert tuple(batch["class"].shape) == (0,)
    after = model.classifier.weight.detach()
    assert torch.isfinite(after).all()
    # Noise only: std = lr * sigma * C / expected batch size = 0.5 * 1 * 1 / 2 per entry.
    assert not torch.equal(after, before)
    assert float((after - before).abs().max()) < 0.25 * 6


def test_tiny_site_empty_batches_train_finite() -> None:
    private_model, optimizer, loader, model = private_setup(count=2, batch_size=1)
    assert loader.sample_rate == 0.5
    torch.manual_seed(3)

    empty = train_steps(private_model, optimizer, loader, steps=16)

    assert empty > 0
    for name, parameter in model.named_parameters():
        assert torch.isfinite(parameter).all(), name


def linear_step(penalty_weight: float, penalty_in_loss: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Take one DP step on a linear model; return the weights before and after."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    start = model.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = TensorDataset(torch.randn(8, 3), torch.randn(8, 1))
    config = dp_config(delta=1.0e-5, noise_multiplier=1.0)
    noise = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private_model, private_optimizer, loader = attach_dp(
            model, optimizer, DataLoader(data, batch_size=8), config, 1.0, noise_generator=noise
        )
    torch.manual_seed(5)
    inputs, targets = next(iter(loader))

    private_optimizer.zero_grad()
    loss = ((private_model(inputs) - targets) ** 2).mean()
    penalty = penalty_weight * (model.weight**2).sum()
    if penalty_in_loss:
        (loss + penalty).backward()
        private_step(private_optimizer)
    else:
        loss.backward()
        private_step(private_optimizer, penalty)
    return start, model.weight.detach().clone()


def test_private_step_adds_penalty_gradient() -> None:
    start, without = linear_step(0.0, penalty_in_loss=False)
    _, with_penalty = linear_step(3.0, penalty_in_loss=False)

    # d/dw of 3 * sum(w^2) is 6 * w; SGD with lr 0.1 moves by a further -0.6 * w.
    expected = without - 0.1 * 6.0 * start
    assert torch.allclose(with_penalty, expected, atol=1e-6)


def test_penalty_inside_loss_is_dropped_by_opacus() -> None:
    _, without = linear_step(0.0, penalty_in_loss=True)
    _, with_penalty = linear_step(3.0, penalty_in_loss=True)

    assert torch.equal(with_penalty, without)


@pytest.mark.parametrize(
    ("batch", "expected"),
    [
        ([], True),
        ({}, True),
        ({"image": torch.empty(0, 1, 4, 4, 4), "class": torch.empty(0)}, True),
        ({"image": torch.zeros(1, 1, 4, 4, 4), "class": torch.zeros(1)}, False),
        ([torch.empty(0, 3), torch.empty(0)], True),
        (torch.zeros(2, 3), False),
    ],
)
def test_is_empty_batch_cases(batch: Any, expected: bool) -> None:
    assert is_empty_batch(batch) is expected
