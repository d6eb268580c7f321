"""Joint pooled training: the upper-bound baseline of the method comparison.

All sites' training data is pooled in one process (something a real federation
never does) and one model learns every task of the curriculum at once, with every
parameter trainable, so there is no order of stages to forget along. Its test
metrics are computed at each site on the same test splits as the federation and
pooled the same way, weighted by test cases. The result is written as a one-row
registry version, so the report reads it like any other method.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from client.preprocess import PreprocessConfig, load_task_dataset, split_counts
from client.site_config import SiteConfig, load_site_config
from client.training import StageRequest, eval_split, evaluate_split
from server.curriculum import Curriculum, Stage
from server.federation import build_initial_model
from server.registry import Registry
from unicon_model.evaluation import primary_metric
from unicon_model.log import get_logger
from unicon_model.losses import task_loss
from unicon_model.metrics import AccuracyMatrix, MetricValue
from unicon_model.model import UniconModel

logger = get_logger(__name__)

JOINT_STAGE = "joint"


def _preprocess(stage: Stage) -> PreprocessConfig:
    pre = stage.settings.preprocess
    return PreprocessConfig(
        spacing=pre.spacing,
        patch_size=pre.patch_size,
        ct_window=pre.ct_window,
        suv_scale=pre.suv_scale,
    )


def _num_classes(stage: Stage) -> int:
    return stage.task.num_classes if stage.task.kind != "prognosis" else 2


def _pooled_loader(sites: list[SiteConfig], stage: Stage, seed: int) -> DataLoader[Any] | None:
    parts: list[Dataset[Any]] = []
    for site in sites:
        if site.dataset_for(stage.task.name) is None:
            continue
        if split_counts(site, stage.task.name).get("train", 0) == 0:
            continue
        parts.append(
            load_task_dataset(
                site, stage.task.name, _preprocess(stage), split="train", train=True,
                num_classes=_num_classes(stage), seed=seed,
            )
        )  # fmt: skip
    if not parts:
        return None
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        ConcatDataset(parts),
        batch_size=stage.settings.batch_size,
        shuffle=True,
        generator=generator,
    )


def _request(curriculum: Curriculum, stage: Stage, model: UniconModel) -> StageRequest:
    return StageRequest(
        run_id="joint",
        stage=JOINT_STAGE,
        task=stage.task.name,
        model_spec=model.spec,
        local_epochs=1,
        optimizer=stage.settings.optimizer,
        learning_rate=stage.settings.learning_rate,
        batch_size=stage.settings.batch_size,
        consolidation="none",
        consolidation_weight=0.0,
        preprocess=_preprocess(stage),
        seed=curriculum.seed,
        server_round=0,
    )


def takes_part(epoch: int, budget: int, epochs: int) -> bool:
    """Whether a task with ``budget`` passes takes part in ``epoch`` of ``epochs`` (0-based).

    Each task gets as many passes over its pooled data as its stage's rounds x local
    epochs in the federation, spread evenly over the joint run: a task of 12 passes in a
    run of 40 epochs takes part in every third or fourth epoch. Giving every task the
    longest stage's passes would make the joint baseline stronger than the federation
    for reasons of training budget alone, and slower.
    """
    return (epoch + 1) * budget // epochs > epoch * budget // epochs


def run_joint(curriculum: Curriculum, site_files: list[Path], registry_dir: Path) -> Path:
    """Train every task on the pooled data of all sites and write one registry version."""
    started = time.monotonic()
    sites = [load_site_config(path) for path in site_files]
    model = build_initial_model(curriculum)
    for index, stage in enumerate(curriculum.stages):
        model.grow(stage.task, seed=curriculum.seed * 1000 + index)
    model.set_trainable([name for name, _ in model.named_parameters()])

    loaders = {s.task.name: _pooled_loader(sites, s, curriculum.seed) for s in curriculum.stages}
    stages = {s.task.name: s for s in curriculum.stages}
    # One optimizer per task, so each task keeps the learning rate its stage sets.
    optimizers = {
        name: torch.optim.Adam(model.parameters(), lr=stages[name].settings.learning_rate)
        for name in loaders
    }
    budgets = {s.task.name: s.settings.rounds * s.settings.local_epochs for s in curriculum.stages}
    epochs = max(budgets.values())
    losses: dict[str, list[float]] = {name: [] for name in loaders}
    model.train()
    for epoch in range(epochs):
        iterators = {
            name: iter(loader)
            for name, loader in loaders.items()
            if loader is not None and takes_part(epoch, budgets[name], epochs)
        }
        # Alternate tasks batch by batch so that no task comes last and overwrites the others.
        while iterators:
            for name in list(iterators):
                batch = next(iterators[name], None)
                if batch is None:
                    del iterators[name]
                    continue
                optimizer = optimizers[name]
                optimizer.zero_grad(set_to_none=True)
                loss = task_loss(stages[name].task, model(batch["image"], name), batch)
                loss.backward()
                optimizer.step()
                losses[name].append(float(loss.item()))
        logger.info("joint training epoch %d/%d done", epoch + 1, epochs)
    model.eval()

    evaluation: dict[str, dict[str, Any]] = {}
    pooled: dict[str, dict[str, Any]] = {}
    for stage in curriculum.stages:
        task = stage.task.name
        metric = primary_metric(stage.task.kind)
        values, weights = [], []
        for site in sites:
            if site.dataset_for(task) is None:
                continue
            split = eval_split(site, task)
            count = split_counts(site, task).get(split, 0)
            result = evaluate_split(
                model, site, _request(curriculum, stage, model), stage.task, split
            )
            site_metrics = evaluation.setdefault(site.site, {"metrics": {}, "undefined": {}})
            site_metrics["metrics"][f"{task}.num-eval"] = float(count)
            for name, result_value in result.items():
                if result_value.value is None:
                    site_metrics["undefined"][f"{task}.{name}"] = result_value.reason or "undefined"
                else:
                    site_metrics["metrics"][f"{task}.{name}"] = result_value.value
            primary = result.get(metric)
            if primary is not None and primary.value is not None and count > 0:
                values.append(float(primary.value))
                weights.append(count)
        if values:
            pooled_value = sum(v * w for v, w in zip(values, weights, strict=True)) / sum(weights)
            pooled[task] = {"metric": metric, "value": pooled_value, "sites": len(values)}
        else:
            pooled[task] = {"metric": metric, "value": None, "reason": "no site could compute it"}

    matrix = AccuracyMatrix(metric="task metric")
    matrix.add_stage(JOINT_STAGE, curriculum.stages[-1].task.name)
    for stage in curriculum.stages:
        entry = pooled[stage.task.name]
        matrix.set(JOINT_STAGE, stage.task.name, MetricValue(entry["value"], entry.get("reason")))
    state = model.state_dict()
    report = {
        "stage": JOINT_STAGE,
        "task": "all",
        "rounds": [],
        "evaluation": evaluation,
        "pooled": pooled,
        "trainable_parameters": int(sum(v.numel() for v in state.values())),
        "total_parameters": int(sum(v.numel() for v in state.values())),
        "full_model_bytes": int(sum(v.numel() * v.element_size() for v in state.values())),
        "sites": [s.site for s in sites],
        "excluded_sites": {},
        "train_loss": {k: (sum(v) / len(v) if v else None) for k, v in losses.items()},
        "wall_time_s": round(time.monotonic() - started, 3),
    }
    Registry(registry_dir).write_version(
        index=0,
        stage=JOINT_STAGE,
        model=model,
        curriculum=curriculum.to_dict(),
        metrics=report,
        accuracy_matrix={"metric": matrix.metric, "rows": matrix.to_rows()},
    )
    return registry_dir
