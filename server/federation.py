"""Running continual stages over a Flower ``Grid``.

``run_stage`` is the whole life of one stage: grow the model, find the sites that
hold data for the stage's task, run the rounds with ``PartialFedAvg``, checkpoint
every round, compute the Fisher when a later stage needs it, evaluate every task
learned so far at every site, and write a registry version. ``run_curriculum``
runs several stages in order within one Flower run; an admin can also launch each
stage as its own run, which resumes from the registry.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from server.curriculum import CentralDPSettings, Curriculum, Stage
from server.registry import Registry, VersionInfo
from server.strategy import CENTRAL_DP_DELTA, PartialFedAvg, SiteNode, central_dp_epsilon
from unicon_model import wire
from unicon_model.consolidation import merge_fishers
from unicon_model.evaluation import primary_metric
from unicon_model.log import get_logger
from unicon_model.metrics import AccuracyMatrix, MetricValue
from unicon_model.model import UniconModel
from unicon_model.pretrained import load_backbone_checkpoint
from unicon_model.serialization import group_hashes, parameter_group

logger = get_logger(__name__)


class StageFailed(RuntimeError):
    """A stage that cannot complete: too few sites, or every reply rejected."""


@dataclass(frozen=True)
class FederationOptions:
    """Server-side settings of a run that are not part of the curriculum."""

    registry: Path
    run_id: str = "local"
    node_wait_s: float = 120.0


@dataclass
class StageReport:
    """Measurements of one stage on the server, also stored as ``metrics.json``."""

    stage: str
    task: str
    rounds: list[dict[str, Any]] = field(default_factory=list)
    evaluation: dict[str, dict[str, Any]] = field(default_factory=dict)
    pooled: dict[str, dict[str, Any]] = field(default_factory=dict)
    trainable_parameters: int = 0
    total_parameters: int = 0
    full_model_bytes: int = 0
    sites: list[str] = field(default_factory=list)
    excluded_sites: dict[str, str] = field(default_factory=dict)
    wall_time_s: float = 0.0
    central_dp: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "task": self.task,
            "rounds": self.rounds,
            "evaluation": self.evaluation,
            "pooled": self.pooled,
            "trainable_parameters": self.trainable_parameters,
            "total_parameters": self.total_parameters,
            "full_model_bytes": self.full_model_bytes,
            "sites": self.sites,
            "excluded_sites": self.excluded_sites,
            "wall_time_s": self.wall_time_s,
            "central_dp": self.central_dp,
        }


def _to_record(tensors: Mapping[str, torch.Tensor | np.ndarray]) -> ArrayRecord:
    """Pack named tensors into an ``ArrayRecord`` in name order."""
    record = ArrayRecord()
    for name in sorted(tensors):
        value = tensors[name]
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        record[name] = Array(np.ascontiguousarray(array))
    return record


def build_initial_model(curriculum: Curriculum) -> UniconModel:
    """Build the stage-0 model: the backbone, loaded from the pretrained file if configured."""
    torch.manual_seed(curriculum.seed)
    model = UniconModel(curriculum.backbone)
    if curriculum.pretrained is not None:
        load_backbone_checkpoint(model, curriculum.pretrained)
        logger.info("loaded pretrained backbone from %s", curriculum.pretrained)
    return model


def _wait_for_nodes(grid: Grid, minimum: int, wait_s: float) -> list[int]:
    deadline = time.monotonic() + wait_s
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= minimum or time.monotonic() > deadline:
            return node_ids
        time.sleep(1.0)


def discover_sites(
    grid: Grid, tasks: Sequence[str], minimum: int, wait_s: float, timeout: float
) -> list[SiteNode]:
    """Query every connected node for its site name, data counts and cached groups."""
    node_ids = _wait_for_nodes(grid, minimum, wait_s)
    config = ConfigRecord({"tasks": list(tasks)})
    messages = [
        Message(
            content=RecordDict({wire.CONFIG: config}),
            message_type=wire.QUERY_SITE_INFO,
            dst_node_id=n,
        )
        for n in node_ids
    ]
    nodes: list[SiteNode] = []
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node_id = reply.metadata.src_node_id
        if reply.has_error():
            logger.warning("node %s failed the site query: %s", node_id, reply.error.reason)
            continue
        info = reply.content.config_records[wire.SITE_INFO]
        counts = reply.content.metric_records[wire.METRICS]
        node = SiteNode(
            node_id=node_id,
            site=str(info["site"]),
            num_train=0,
            cached_groups=set(info.get("cached-groups", [])),  # type: ignore[arg-type]
        )
        node.counts = {k: int(v) for k, v in counts.items() if isinstance(v, int | float)}
        nodes.append(node)
    nodes.sort(key=lambda n: n.site)
    return nodes


def _frozen_records(
    state: Mapping[str, torch.Tensor], trainable: set[str], nodes: Iterable[SiteNode]
) -> tuple[dict[int, ArrayRecord], dict[str, str]]:
    """Return, per node, the frozen groups it lacks, and the hash of every frozen group."""
    frozen_state = {k: v for k, v in state.items() if k not in trainable}
    hashes = group_hashes(frozen_state)
    by_group: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in frozen_state.items():
        by_group.setdefault(parameter_group(name), {})[name] = value
    records: dict[int, ArrayRecord] = {}
    for node in nodes:
        missing = {g for g, h in hashes.items() if h not in node.cached_groups}
        if missing:
            tensors = {k: v for g in sorted(missing) for k, v in by_group[g].items()}
            records[node.node_id] = _to_record(tensors)
            node.cached_groups.update(hashes[g] for g in missing)
    return records, hashes


def _stage_config(
    curriculum: Curriculum, stage: Stage, model: UniconModel, options: FederationOptions
) -> ConfigRecord:
    settings = stage.settings
    pre = settings.preprocess
    return ConfigRecord(
        {
            "run-id": options.run_id,
            "stage": stage.name,
            "task": stage.task.name,
            "model-spec": json.dumps(model.spec.to_dict(), sort_keys=True),
            "local-epochs": settings.local_epochs,
            "optimizer": settings.optimizer,
            "learning-rate": settings.learning_rate,
            "batch-size": settings.batch_size,
            "consolidation": settings.consolidation,
            "consolidation-weight": settings.consolidation_weight,
            "spacing": [float(s) for s in pre.spacing],
            "patch-size": [int(s) for s in pre.patch_size],
            "ct-window": [float(s) for s in pre.ct_window],
            "suv-scale": float(pre.suv_scale),
            "seed": curriculum.seed,
            "total-rounds": settings.rounds,
        }
    )


def _task_preprocess(curriculum: Curriculum, index: int) -> str:
    """Return, as JSON, the preprocessing of every task up to stage ``index``.

    A task is always evaluated with the preprocessing it was trained with, which may
    differ from the current stage's (spacing and patch size are per stage).
    """
    mapping = {}
    for stage in curriculum.stages[: index + 1]:
        pre = stage.settings.preprocess
        mapping[stage.task.name] = {
            "spacing": list(pre.spacing),
            "patch-size": list(pre.patch_size),
            "ct-window": list(pre.ct_window),
            "suv-scale": pre.suv_scale,
        }
    return json.dumps(mapping, sort_keys=True)


def run_stage(
    grid: Grid,
    curriculum: Curriculum,
    stage_name: str,
    options: FederationOptions,
) -> VersionInfo:
    """Run one stage of the curriculum to a new registry version (or resume it)."""
    registry = Registry(options.registry)
    index = curriculum.index(stage_name)
    stage = curriculum.stages[index]
    settings = stage.settings
    started = time.monotonic()

    done = registry.version_for_stage(stage.name)
    if done is not None:
        logger.info("stage=%s already in the registry as %s; not retrained", stage.name, done.name)
        return done
    latest = registry.latest()
    expected_parent = curriculum.stages[index - 1].name if index > 0 else None
    if (latest.stage if latest else None) != expected_parent:
        raise StageFailed(
            f"stage {stage.name!r} continues from stage {expected_parent!r}, but the registry's latest "
            f"version is {latest.name if latest else 'empty'}; launch {expected_parent!r} first"
        )

    # Grow the model for the stage's task and decide what trains.
    model = registry.load_model(latest) if latest else build_initial_model(curriculum)
    model.grow(stage.task, seed=curriculum.seed * 1000 + index)
    sets = model.trainable_sets(stage.task.name, finetune_shared=settings.train == "shared")
    trainable_names = sorted(sets.new + (sets.shared if settings.train == "shared" else []))
    state = model.state_dict()
    trainable_shapes = {n: tuple(state[n].shape) for n in trainable_names}
    report = StageReport(stage=stage.name, task=stage.task.name)
    report.trainable_parameters = int(sum(state[n].numel() for n in trainable_names))
    report.total_parameters = int(sum(v.numel() for v in state.values()))
    report.full_model_bytes = int(sum(v.numel() * v.element_size() for v in state.values()))
    logger.info(
        "stage=%s task=%s: %d trainable of %d parameters (%s)",
        stage.name,
        stage.task.name,
        report.trainable_parameters,
        report.total_parameters,
        settings.train,
    )
    registry.log_event({"event": "stage-start", "stage": stage.name, "run_id": options.run_id})

    # Find the sites holding data for this task.
    task_names = [t.name for t in model.spec.tasks]
    nodes = discover_sites(
        grid, task_names, settings.min_sites, options.node_wait_s, settings.timeout_s
    )
    participants: list[SiteNode] = []
    for node in nodes:
        counts = node.counts
        node.num_train = counts.get(f"{stage.task.name}.num-train", 0)
        if node.num_train > 0:
            participants.append(node)
        else:
            report.excluded_sites[node.site] = f"no training data for task {stage.task.name}"
            logger.info(
                "stage=%s site=%s excluded: no training data for %s",
                stage.name,
                node.site,
                stage.task.name,
            )
    report.sites = [n.site for n in participants]
    if len(participants) < settings.min_sites:
        raise StageFailed(
            f"stage {stage.name!r} needs at least {settings.min_sites} sites with training data for task "
            f"{stage.task.name!r}, found {len(participants)} ({report.sites}) among {len(nodes)} connected "
            f"nodes; add sites with this task's dataset or lower min_sites in the curriculum"
        )

    # Resume from the last completed round of a crashed run.
    first_round = 1
    checkpoint = registry.load_checkpoint(stage.name)
    if checkpoint is not None:
        done_round, tensors, meta = checkpoint
        model.load_state_dict({**model.state_dict(), **tensors})
        report.rounds = list(meta.get("rounds", []))
        first_round = done_round + 1
        logger.info("stage=%s resuming after completed round %d", stage.name, done_round)

    strategy = PartialFedAvg(
        trainable_shapes, min_sites=settings.min_sites, central_dp=settings.central_dp
    )
    config = _stage_config(curriculum, stage, model, options)
    reference_record: ArrayRecord | None = None
    extra: dict[str, ArrayRecord] = {}
    if settings.train == "shared":
        reference = {n: state[n] for n in sets.shared}
        reference_record = _to_record(reference)
        extra[wire.REFERENCE] = reference_record
        if settings.consolidation == "ewc":
            fisher = registry.load_fisher(latest) if latest else None
            if not fisher:
                raise StageFailed(
                    f"stage {stage.name!r} uses EWC but the registry version {latest.name if latest else None} "
                    "holds no Fisher; the previous stage must run with a curriculum in which a later stage uses ewc"
                )
            extra[wire.FISHER] = _to_record({k: v for k, v in fisher.items() if k in reference})
    sites_by_node = {n.node_id: n.site for n in participants}

    for server_round in range(first_round, settings.rounds + 1):
        round_start = time.monotonic()
        state = model.state_dict()
        arrays = _to_record({n: state[n] for n in trainable_names})
        frozen, frozen_hashes = _frozen_records(state, set(trainable_names), participants)
        config["frozen-groups"] = json.dumps(frozen_hashes, sort_keys=True)
        messages = strategy.configure_train(
            server_round, arrays, config, participants, frozen, extra
        )
        bytes_sent = {
            sites_by_node[m.metadata.dst_node_id]: sum(
                r.count_bytes() for r in m.content.array_records.values()
            )
            for m in messages
        }
        logger.info(
            "stage=%s round=%d/%d: training at %d sites",
            stage.name,
            server_round,
            settings.rounds,
            len(messages),
        )
        replies = list(grid.send_and_receive(messages, timeout=settings.timeout_s))
        outcome = strategy.aggregate_train(server_round, replies, sites_by_node)
        answered = {sites_by_node.get(r.metadata.src_node_id) for r in replies}
        silent = [n.site for n in participants if n.site not in answered]
        for site in silent:
            logger.warning(
                "stage=%s round=%d site=%s sent no reply within %.0f s",
                stage.name,
                server_round,
                site,
                settings.timeout_s,
            )
        if outcome.arrays is None:
            raise StageFailed(
                f"stage {stage.name!r} round {server_round}: {len(outcome.accepted)} accepted replies, fewer than "
                f"min_sites={settings.min_sites}; rejected {outcome.rejected}, declined {outcome.declined}, "
                f"silent {silent} (timeout {settings.timeout_s:.0f} s)"
            )
        model.load_state_dict(
            {
                **model.state_dict(),
                **{k: torch.from_numpy(np.array(v)) for k, v in outcome.arrays.items()},
            }
        )
        round_record = {
            "round": server_round,
            "accepted": outcome.accepted,
            "rejected": outcome.rejected,
            "declined": outcome.declined,
            "silent": silent,
            "site_metrics": outcome.site_metrics,
            "bytes_sent": bytes_sent,
            "bytes_received": outcome.bytes_received,
            "trainable_bytes": int(arrays.count_bytes()),
            "wall_time_s": round(time.monotonic() - round_start, 3),
        }
        if outcome.central_dp is not None:
            round_record["central_dp"] = outcome.central_dp
        report.rounds.append(round_record)
        logger.info(
            "stage=%s round=%d done: %d accepted, sent %d B, received %d B",
            stage.name,
            server_round,
            len(outcome.accepted),
            sum(bytes_sent.values()),
            sum(outcome.bytes_received.values()),
        )
        final_state = model.state_dict()
        registry.save_checkpoint(
            stage.name,
            server_round,
            {n: final_state[n] for n in trainable_names},
            {"rounds": report.rounds},
        )

    report.central_dp = _central_dp_summary(settings.central_dp, report.rounds)
    state = model.state_dict()
    fisher_total: dict[str, torch.Tensor] | None = None
    if curriculum.fisher_needed_after(index):
        fisher_total = _federated_fisher(grid, model, stage, config, participants, registry, latest)

    config["task-preprocess"] = _task_preprocess(curriculum, index)
    evaluate_all(grid, model, config, nodes, settings.timeout_s, report)
    matrix = _accuracy_matrix(registry, latest, index, model, report)
    report.wall_time_s = round(time.monotonic() - started, 3)
    info = registry.write_version(
        index=index,
        stage=stage.name,
        model=model,
        curriculum=curriculum.to_dict(),
        metrics=report.to_dict(),
        accuracy_matrix={"metric": matrix.metric, "rows": matrix.to_rows()},
        fisher=fisher_total,
    )
    registry.clear_checkpoint(stage.name)
    registry.log_event(
        {"event": "stage-end", "stage": stage.name, "version": info.name, "run_id": options.run_id}
    )
    return info


def _central_dp_summary(
    central_dp: CentralDPSettings | None, rounds: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """Return the stage's central DP settings and its site-level epsilon so far.

    Every round that released a noisy aggregate counts, resumed rounds included.
    """
    if central_dp is None:
        return None
    releases = sum(1 for round_record in rounds if "central_dp" in round_record)
    return {
        "noise_multiplier": central_dp.noise_multiplier,
        "clipping_norm": central_dp.clipping_norm,
        "delta": CENTRAL_DP_DELTA,
        "releases": releases,
        "sample_rate": 1.0,
        "epsilon": central_dp_epsilon(central_dp.noise_multiplier, releases, CENTRAL_DP_DELTA),
    }


def _federated_fisher(
    grid: Grid,
    model: UniconModel,
    stage: Stage,
    config: ConfigRecord,
    participants: list[SiteNode],
    registry: Registry,
    latest: VersionInfo | None,
) -> dict[str, torch.Tensor]:
    """Collect each site's diagonal Fisher of the shared parameters and merge them."""
    state = model.state_dict()
    frozen, hashes = _frozen_records(state, set(), participants)
    fisher_config = ConfigRecord(dict(config))
    fisher_config["frozen-groups"] = json.dumps(hashes, sort_keys=True)
    messages = []
    for node in participants:
        content = RecordDict({wire.CONFIG: fisher_config})
        if node.node_id in frozen:
            content[wire.FROZEN] = frozen[node.node_id]
        messages.append(
            Message(content=content, message_type=wire.QUERY_FISHER, dst_node_id=node.node_id)
        )
    parts: list[tuple[dict[str, torch.Tensor], int]] = []
    for reply in grid.send_and_receive(messages, timeout=stage.settings.timeout_s):
        if reply.has_error() or wire.FISHER not in reply.content.array_records:
            logger.warning(
                "stage=%s node %s returned no Fisher", stage.name, reply.metadata.src_node_id
            )
            continue
        record = reply.content.array_records[wire.FISHER]
        fisher = {k: torch.from_numpy(np.array(a.numpy())) for k, a in record.items()}
        if not all(torch.isfinite(v).all() for v in fisher.values()):
            logger.warning(
                "stage=%s node %s returned a non-finite Fisher; left out",
                stage.name,
                reply.metadata.src_node_id,
            )
            continue
        count = reply.content.metric_records[wire.METRICS].get(wire.NUM_EXAMPLES)
        if not isinstance(count, int) or count <= 0:
            logger.warning(
                "stage=%s node %s sent a Fisher without a sample count; left out",
                stage.name,
                reply.metadata.src_node_id,
            )
            continue
        parts.append((fisher, count))
    if not parts:
        raise StageFailed(
            f"stage {stage.name!r}: no site returned a usable Fisher, which a later EWC stage needs"
        )
    merged = merge_fishers(parts)
    previous = registry.load_fisher(latest) if latest else None
    # Online EWC: Fishers of successive stages add up.
    for name, value in (previous or {}).items():
        merged[name] = merged[name] + value if name in merged else value
    return merged


def evaluate_all(
    grid: Grid,
    model: UniconModel,
    config: ConfigRecord,
    nodes: list[SiteNode],
    timeout: float,
    report: StageReport,
) -> None:
    """Evaluate every task learned so far at every site with data for it."""
    state = model.state_dict()
    tasks = [t.name for t in model.spec.tasks]
    frozen, hashes = _frozen_records(state, set(), nodes)
    eval_config = ConfigRecord(dict(config))
    eval_config["frozen-groups"] = json.dumps(hashes, sort_keys=True)
    eval_config["model-spec"] = json.dumps(model.spec.to_dict(), sort_keys=True)
    eval_config["tasks"] = tasks
    messages = []
    for node in nodes:
        content = RecordDict({wire.CONFIG: eval_config})
        if node.node_id in frozen:
            content[wire.FROZEN] = frozen[node.node_id]
        messages.append(
            Message(content=content, message_type=wire.EVALUATE_TASKS, dst_node_id=node.node_id)
        )
    site_of = {n.node_id: n.site for n in nodes}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        site = site_of.get(reply.metadata.src_node_id, str(reply.metadata.src_node_id))
        if reply.has_error():
            logger.warning("evaluation at site=%s failed: %s", site, reply.error.reason)
            continue
        metrics = dict(reply.content.metric_records[wire.METRICS])
        reasons = reply.content.config_records.get(wire.REASONS)
        report.evaluation[site] = {
            "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)},
            "undefined": {k: str(v) for k, v in (reasons or {}).items()},
        }
    for task in model.spec.tasks:
        metric = primary_metric(task.kind)
        key = wire.task_metric_key(task.name, metric)
        count_key = wire.task_metric_key(task.name, "num-eval")
        values, weights = [], []
        # Sites in name order, so the pooled value does not depend on reply order.
        for _, site_eval in sorted(report.evaluation.items()):
            site_metrics = site_eval["metrics"]
            if key in site_metrics and site_metrics.get(count_key, 0) > 0:
                values.append(site_metrics[key])
                weights.append(site_metrics[count_key])
        if values:
            pooled = float(np.average(values, weights=weights))
            report.pooled[task.name] = {
                "metric": metric,
                "value": pooled,
                "sites": len(values),
                "cases": int(sum(weights)),
            }
        else:
            report.pooled[task.name] = {
                "metric": metric,
                "value": None,
                "reason": "no site could compute it",
            }
        logger.info(
            "evaluation task=%s %s=%s", task.name, metric, report.pooled[task.name].get("value")
        )


def _accuracy_matrix(
    registry: Registry,
    latest: VersionInfo | None,
    index: int,
    model: UniconModel,
    report: StageReport,
) -> AccuracyMatrix:
    if latest is not None:
        matrix = AccuracyMatrix.from_rows(
            registry.read_json(latest, "accuracy_matrix.json")["rows"]
        )
    else:
        matrix = AccuracyMatrix(metric="task metric")
    matrix.add_stage(report.stage, report.task)
    for task in model.spec.tasks:
        pooled = report.pooled.get(task.name, {})
        value = pooled.get("value")
        reason = None if value is not None else str(pooled.get("reason", "not evaluated"))
        matrix.set(report.stage, task.name, MetricValue(value, reason))
    return matrix
