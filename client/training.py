"""Local training, evaluation and Fisher computation at a site, free of Flower types.

The ClientApp handlers (``client/app.py``) parse a message into a ``StageRequest``,
call these functions, and turn the results back into records.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from client.preprocess import PreprocessConfig, load_task_dataset, split_counts
from client.site_config import SiteConfig
from unicon_model.consolidation import Consolidation, build_consolidation, diagonal_fisher
from unicon_model.evaluation import evaluate_task, primary_metric
from unicon_model.log import get_logger
from unicon_model.losses import task_loss
from unicon_model.metrics import MetricValue
from unicon_model.model import UniconModel
from unicon_model.spec import ModelSpec, TaskSpec

logger = get_logger(__name__)


class LocalTrainingError(RuntimeError):
    """Local training that produced unusable parameters (never sent to the server)."""


def _preprocess_from(config: Mapping[str, Any]) -> PreprocessConfig:
    """Read preprocessing settings from message config keys (``spacing``, ``patch-size``, ...)."""
    return PreprocessConfig(
        spacing=tuple(float(v) for v in config.get("spacing", [3.0, 3.0, 3.0])),  # type: ignore[arg-type]
        patch_size=tuple(int(v) for v in config.get("patch-size", [32, 32, 32])),  # type: ignore[arg-type]
        ct_window=tuple(float(v) for v in config.get("ct-window", [-1000.0, 400.0])),  # type: ignore[arg-type]
        suv_scale=float(config.get("suv-scale", 10.0)),
    )


@dataclass(frozen=True)
class StageRequest:
    """Request of the server to a site for one stage, parsed from the message config."""

    run_id: str
    stage: str
    task: str
    model_spec: ModelSpec
    local_epochs: int
    optimizer: str
    learning_rate: float
    batch_size: int
    consolidation: str
    consolidation_weight: float
    preprocess: PreprocessConfig
    seed: int
    server_round: int
    total_rounds: int = 1
    frozen_groups: dict[str, str] = field(default_factory=dict)
    tasks: tuple[str, ...] = ()
    task_preprocess: dict[str, PreprocessConfig] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> StageRequest:
        """Parse the ``config`` record of a server message."""
        return cls(
            run_id=str(config.get("run-id", "local")),
            stage=str(config["stage"]),
            task=str(config["task"]),
            model_spec=ModelSpec.from_dict(json.loads(str(config["model-spec"]))),
            local_epochs=int(config.get("local-epochs", 1)),
            optimizer=str(config.get("optimizer", "adam")),
            learning_rate=float(config.get("learning-rate", 1e-3)),
            batch_size=int(config.get("batch-size", 4)),
            consolidation=str(config.get("consolidation", "none")),
            consolidation_weight=float(config.get("consolidation-weight", 1.0)),
            preprocess=_preprocess_from(config),
            seed=int(config.get("seed", 0)),
            server_round=int(config.get("server-round", 0)),
            total_rounds=int(config.get("total-rounds", 1)),
            frozen_groups=json.loads(str(config.get("frozen-groups", "{}"))),
            tasks=tuple(str(t) for t in config.get("tasks", [])),
            task_preprocess={
                task: _preprocess_from(values)
                for task, values in json.loads(str(config.get("task-preprocess", "{}"))).items()
            },
        )

    def preprocess_for(self, task: str) -> PreprocessConfig:
        """Return the preprocessing ``task`` was trained with (the stage's by default)."""
        return self.task_preprocess.get(task, self.preprocess)

    def task_spec(self, name: str | None = None) -> TaskSpec:
        """Return the spec of ``name`` (the stage's task by default)."""
        wanted = name or self.task
        for task in self.model_spec.tasks:
            if task.name == wanted:
                return task
        raise KeyError(f"task {wanted!r} is not in the model spec")


@dataclass
class TrainResult:
    """Parameters and metrics of one local training call."""

    trainable: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float]
    undefined: dict[str, str]


def local_seed(request: StageRequest, site: str) -> int:
    """Return a seed that differs per site, stage and round but repeats across reruns."""
    text = f"{request.seed}/{request.stage}/{request.server_round}/{site}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def task_counts(
    site: SiteConfig, tasks: Sequence[str], spec: ModelSpec | None = None
) -> dict[str, int]:
    """Count the training and evaluation cases of each requested task at the site."""
    counts: dict[str, int] = {}
    for task in tasks:
        dataset = site.dataset_for(task)
        if dataset is None:
            continue
        splits = split_counts(site, task)
        counts[f"{task}.num-train"] = int(splits.get("train", 0))
        counts[f"{task}.num-eval"] = int(splits.get("test", 0) or splits.get("val", 0))
    return counts


def _num_classes(spec: TaskSpec) -> int:
    return spec.num_classes if spec.kind != "prognosis" else 2


def _make_optimizer(
    request: StageRequest, parameters: list[torch.nn.Parameter]
) -> torch.optim.Optimizer:
    if request.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=request.learning_rate, momentum=0.9)
    return torch.optim.Adam(parameters, lr=request.learning_rate)


def eval_split(site: SiteConfig, task: str) -> str:
    """Return the split a site evaluates a task on: ``test`` when present, else ``val``."""
    counts = split_counts(site, task)
    return "test" if counts.get("test", 0) > 0 else "val"


def train_local(
    model: UniconModel,
    site: SiteConfig,
    request: StageRequest,
    trainable_names: Sequence[str],
    reference: Mapping[str, torch.Tensor] | None = None,
    fisher: Mapping[str, torch.Tensor] | None = None,
    dp_hook: Any = None,
) -> TrainResult:
    """Train the stage's trainable parameters on the site's training split.

    The loss is the task loss plus the stage's consolidation penalty. Parameters
    that are not in ``trainable_names`` keep ``requires_grad=False`` and stay
    bit-identical.

    Raises
    ------
    LocalTrainingError
        When the loss or a trained parameter becomes non-finite, so that nothing
        unusable is sent to the server.
    """
    spec = request.task_spec()
    torch.manual_seed(local_seed(request, site.site))
    model.set_trainable(trainable_names)
    train_data: Dataset = load_task_dataset(
        site,
        request.task,
        request.preprocess,
        split="train",
        train=True,
        num_classes=_num_classes(spec),
        seed=request.seed,
    )
    num_examples = len(train_data)  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(local_seed(request, site.site))
    loader = DataLoader(
        train_data, batch_size=request.batch_size, shuffle=True, generator=generator
    )
    parameters = [p for n, p in model.named_parameters() if n in set(trainable_names)]
    optimizer = _make_optimizer(request, parameters)

    penalty = None
    if request.consolidation != "none":
        penalty = _consolidation_at_reference(model, request, reference or {}, fisher)

    if dp_hook is not None:
        model_for_training, optimizer, loader = dp_hook.attach(model, optimizer, loader)
    else:
        model_for_training = model

    model_for_training.train()
    losses: list[float] = []
    for _ in range(request.local_epochs):
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            # EWC and L2-SP read no data: under DP their gradient is added after clipping.
            param_penalty = None
            if penalty is not None and request.consolidation in ("ewc", "l2sp"):
                param_penalty = penalty.penalty(model, batch["image"])
            if batch["image"].shape[0] == 0:
                # Poisson sampling under DP can draw an empty batch; it still counts as a step.
                if dp_hook is not None:
                    dp_hook.empty_step(optimizer, param_penalty)
                continue
            output = model_for_training(batch["image"], request.task)
            loss = task_loss(spec, output, batch)
            if penalty is not None and request.consolidation == "lwf":
                loss = loss + penalty.penalty(model, batch["image"])
            if param_penalty is not None and dp_hook is None:
                loss = loss + param_penalty
            if not torch.isfinite(loss):
                raise LocalTrainingError(
                    f"stage {request.stage} round {request.server_round}: the loss became {loss.item()}; "
                    "lower the learning rate in the curriculum"
                )
            loss.backward()
            if dp_hook is not None:
                dp_hook.step(optimizer, param_penalty)
            else:
                optimizer.step()
            losses.append(float(loss.item()))

    model.eval()
    state = model.state_dict()
    trainable = {n: state[n].detach().clone() for n in trainable_names}
    for name, value in trainable.items():
        if not torch.isfinite(value).all():
            raise LocalTrainingError(
                f"stage {request.stage} round {request.server_round}: parameter {name} became non-finite; "
                "nothing is sent. Lower the learning rate in the curriculum"
            )

    metrics: dict[str, float] = {
        "train-loss": float(sum(losses) / len(losses)) if losses else math.nan
    }
    undefined: dict[str, str] = {}
    if not losses:
        del metrics["train-loss"]
        undefined["train-loss"] = "no training step ran (every batch was empty)"
    val_results = evaluate_split(model, site, request, spec, "val")
    for name, value in val_results.items():
        key = f"val-{name}"
        if value.value is None:
            undefined[key] = value.reason or "undefined"
        else:
            metrics[key] = float(value.value)
    return TrainResult(
        trainable=trainable, num_examples=num_examples, metrics=metrics, undefined=undefined
    )


def _consolidation_at_reference(
    model: UniconModel,
    request: StageRequest,
    reference: Mapping[str, torch.Tensor],
    fisher: Mapping[str, torch.Tensor] | None,
) -> Consolidation:
    """Build the stage's penalty anchored at the stage-start values of shared parameters.

    A site rebuilds its model every round from the latest aggregate, so the anchor
    (EWC, L2-SP) and the LwF teacher come from ``reference``, the values the server
    recorded when the stage started, not from the current weights.
    """
    current = {
        name: value.detach().clone()
        for name, value in model.state_dict().items()
        if name in reference
    }
    model.load_state_dict({**model.state_dict(), **reference})
    try:
        return build_consolidation(
            request.consolidation,
            model,
            request.task,
            weight=request.consolidation_weight,
            fisher=fisher,
            names=sorted(reference) or None,
        )
    finally:
        model.load_state_dict({**model.state_dict(), **current})


def evaluate_split(
    model: UniconModel, site: SiteConfig, request: StageRequest, spec: TaskSpec, split: str
) -> dict[str, MetricValue]:
    """Evaluate one task on one split of the site's data."""
    counts = split_counts(site, spec.name)
    if counts.get(split, 0) == 0:
        return {
            primary_metric(spec.kind): MetricValue(
                None, f"the site has no {split} cases for {spec.name}"
            )
        }
    data = load_task_dataset(
        site,
        spec.name,
        request.preprocess_for(spec.name),
        split=split,
        train=False,
        num_classes=_num_classes(spec),
        seed=request.seed,
    )
    loader = DataLoader(data, batch_size=1 if spec.kind == "segmentation" else request.batch_size)
    with torch.no_grad():
        return evaluate_task(
            model, spec, loader, roi_size=request.preprocess_for(spec.name).patch_size
        )


def evaluate_tasks(
    model: UniconModel, site: SiteConfig, request: StageRequest
) -> tuple[dict[str, float], dict[str, str]]:
    """Evaluate every requested task with data at the site, on its test (or val) split."""
    metrics: dict[str, float] = {}
    undefined: dict[str, str] = {}
    model.eval()
    for task in request.tasks:
        if site.dataset_for(task) is None:
            continue
        spec = request.task_spec(task)
        split = eval_split(site, task)
        results = evaluate_split(model, site, request, spec, split)
        metrics[f"{task}.num-eval"] = float(split_counts(site, task).get(split, 0))
        for name, value in results.items():
            key = f"{task}.{name}"
            if value.value is None:
                undefined[key] = value.reason or "undefined"
            else:
                metrics[key] = float(value.value)
    return metrics, undefined


def site_fisher(
    model: UniconModel, site: SiteConfig, request: StageRequest, names: Sequence[str]
) -> tuple[dict[str, torch.Tensor], int]:
    """Compute the diagonal Fisher of ``names`` on the site's training split."""
    spec = request.task_spec()
    data = load_task_dataset(
        site,
        request.task,
        request.preprocess,
        split="train",
        train=False,
        num_classes=_num_classes(spec),
        seed=request.seed,
    )
    loader = DataLoader(data, batch_size=1)
    fisher = diagonal_fisher(model, request.task, loader, list(names))
    return fisher, len(data)
