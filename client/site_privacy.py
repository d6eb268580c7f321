"""DP-SGD for one training round at a site: plan against the ledger, train, record.

``SiteDP`` ties the plain functions of ``client.privacy`` to the training loop of
``client.training``: before the round it plans the round's epsilon and declines when
the budget would be passed; during the round it wraps model, optimizer and loader
with Opacus; after the round it appends the steps taken to the privacy ledger and
returns the epsilon spent as metrics.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from client.privacy import (
    DPConfig,
    PrivacyConfigError,
    PrivacyLedger,
    RoundPlan,
    attach_dp,
    check_opacus_compatible,
    plan_private_round,
    private_step,
    step_on_empty_batch,
)
from client.site_config import SiteConfig
from unicon_model.log import get_logger

if TYPE_CHECKING:
    from client.training import StageRequest

logger = get_logger(__name__)


class SiteDP:
    """DP-SGD state of one training round of one site."""

    def __init__(
        self, site: SiteConfig, request: StageRequest, config: DPConfig, total_rounds: int
    ) -> None:
        self.site = site
        self.request = request
        self.config = config
        self.total_rounds = total_rounds
        self.ledger = PrivacyLedger.open(site.state_dir)
        self.plan_result: RoundPlan | None = None
        self.steps = 0
        self.sample_rate = math.nan

    def plan(self, num_train: int) -> str | None:
        """Plan the round; return the reason to decline it, or ``None`` to train."""
        steps_per_epoch = max(1, math.ceil(num_train / max(1, self.request.batch_size)))
        try:
            plan = plan_private_round(
                self.ledger,
                self.config,
                task=self.request.task,
                run_id=self.request.run_id,
                stage=self.request.stage,
                num_samples=num_train,
                batch_size=self.request.batch_size,
                steps_per_round=steps_per_epoch * self.request.local_epochs,
                num_rounds=self.total_rounds,
            )
        except PrivacyConfigError as error:
            return str(error)
        self.plan_result = plan
        if not plan.allowed:
            return plan.reason or "the round would pass the privacy budget"
        return None

    def attach(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader[Any]
    ) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader[Any]]:
        """Wrap the model, optimizer and loader for DP-SGD with the planned noise."""
        problems = check_opacus_compatible(model)
        if problems:
            raise PrivacyConfigError(
                f"{self.site.source}: DP is on, but these modules cannot compute per-sample "
                f"gradients: {problems}; use a model without BatchNorm and in-place operations"
            )
        assert self.plan_result is not None, "plan() must run before attach()"
        private_model, private_optimizer, private_loader = attach_dp(
            model, optimizer, loader, self.config, self.plan_result.noise_multiplier
        )
        self.sample_rate = float(private_loader.sample_rate)
        return private_model, private_optimizer, private_loader

    def step(self, optimizer: torch.optim.Optimizer, penalty: torch.Tensor | None) -> None:
        """Take one private step (the penalty's gradient is added after clipping)."""
        private_step(optimizer, penalty)
        self.steps += 1

    def empty_step(self, optimizer: torch.optim.Optimizer, penalty: torch.Tensor | None) -> None:
        """Take the step of an empty Poisson batch, which the accountant still counts."""
        step_on_empty_batch(optimizer, penalty)
        self.steps += 1

    def record(self) -> dict[str, float]:
        """Append the round to the ledger and return the epsilon metrics of the reply."""
        assert self.plan_result is not None, "plan() must run before record()"
        entry = self.ledger.record_round(
            self.request.task,
            run_id=self.request.run_id,
            stage=self.request.stage,
            server_round=self.request.server_round,
            steps=self.steps,
            sample_rate=self.sample_rate,
            noise_multiplier=self.plan_result.noise_multiplier,
            delta=self.config.delta,
        )
        epsilon = float(
            getattr(
                entry, "epsilon", self.ledger.epsilon_spent(self.request.task, self.config.delta)
            )
        )
        logger.info(
            "site=%s stage=%s round=%d DP-SGD: %d steps, noise %.3f, epsilon spent %.3f (delta %g)",
            self.site.site,
            self.request.stage,
            self.request.server_round,
            self.steps,
            self.plan_result.noise_multiplier,
            epsilon,
            self.config.delta,
        )
        return {
            "dp-epsilon": epsilon,
            "dp-delta": float(self.config.delta),
            "dp-noise-multiplier": float(self.plan_result.noise_multiplier),
            "dp-steps": float(self.steps),
            "dp-sample-rate": float(self.sample_rate),
        }
