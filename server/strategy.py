"""Partial-parameter federated averaging.

``PartialFedAvg`` follows the lifecycle names of Flower's strategies
(``configure_train`` / ``aggregate_train``) but is not a ``flwr`` ``Strategy``
subclass: its messages differ per site (a site that lacks a frozen parameter group
receives it, the others do not) and it only ever sees the stage's trainable tensors,
while the server keeps the full model state and merges the aggregate into it.

Aggregation is FedAvg (McMahan et al., "Communication-Efficient Learning of Deep
Networks from Decentralized Data", AISTATS 2017) over the trainable tensors,
weighted by ``num-examples`` (training samples). Replies with unknown or missing
keys, wrong shapes, non-finite values or an invalid ``num-examples`` are rejected
and logged with the site id.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from unicon_model import wire
from unicon_model.log import get_logger

logger = get_logger(__name__)


@dataclass
class SiteNode:
    """A SuperNode taking part in a stage, and what it already holds."""

    node_id: int
    site: str
    num_train: int
    cached_groups: set[str] = field(default_factory=set)
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class TrainOutcome:
    """What one training round produced."""

    arrays: dict[str, np.ndarray] | None
    accepted: list[str]
    rejected: dict[str, str]
    declined: dict[str, str]
    site_metrics: dict[str, dict[str, float]]
    bytes_received: dict[str, int]


class PartialFedAvg:
    """FedAvg over a named subset of the model's parameters.

    Parameters
    ----------
    trainable_shapes : Mapping[str, tuple[int, ...]]
        Name and shape of every tensor the stage trains; replies must match exactly.
    min_sites : int
        Fewest accepted replies with which a round still counts.
    """

    def __init__(self, trainable_shapes: Mapping[str, tuple[int, ...]], min_sites: int) -> None:
        self.trainable_shapes = dict(trainable_shapes)
        self.min_sites = min_sites

    def configure_train(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        nodes: Iterable[SiteNode],
        frozen_for: Mapping[int, ArrayRecord],
        extra_records: Mapping[str, ArrayRecord] | None = None,
    ) -> list[Message]:
        """Build one training message per site.

        ``frozen_for`` maps a node id to the frozen parameter groups that node does
        not hold yet; a node absent from it receives no frozen tensors.
        """
        messages = []
        for node in nodes:
            round_config = ConfigRecord(dict(config))
            round_config["server-round"] = server_round
            content = RecordDict({wire.TRAINABLE: arrays, wire.CONFIG: round_config})
            if node.node_id in frozen_for:
                content[wire.FROZEN] = frozen_for[node.node_id]
            for key, record in (extra_records or {}).items():
                content[key] = record
            messages.append(
                Message(content=content, message_type=wire.TRAIN_STAGE, dst_node_id=node.node_id)
            )
        return messages

    def validate_reply(self, reply: Message) -> tuple[dict[str, np.ndarray], int]:
        """Return the reply's tensors and ``num-examples``, or raise ``ValueError``."""
        if reply.has_error():
            raise ValueError(f"site reported an error: {reply.error.reason}")
        content = reply.content
        if wire.TRAINABLE not in content.array_records:
            raise ValueError(f"reply has no {wire.TRAINABLE!r} array record")
        record = content.array_records[wire.TRAINABLE]
        received = set(record.keys())
        expected = set(self.trainable_shapes)
        if received != expected:
            unknown = sorted(received - expected)[:5]
            missing = sorted(expected - received)[:5]
            raise ValueError(
                f"tensor names differ from the stage's: unknown {unknown}, missing {missing}"
            )
        tensors: dict[str, np.ndarray] = {}
        for name, array in record.items():
            values = array.numpy()
            if tuple(values.shape) != tuple(self.trainable_shapes[name]):
                raise ValueError(
                    f"tensor {name} has shape {tuple(values.shape)}, expected {self.trainable_shapes[name]}"
                )
            if not np.all(np.isfinite(values)):
                raise ValueError(f"tensor {name} holds non-finite values")
            tensors[name] = values
        metrics = content.metric_records.get(wire.METRICS)
        num_examples = metrics.get(wire.NUM_EXAMPLES) if metrics is not None else None
        if not isinstance(num_examples, int) or num_examples <= 0:
            raise ValueError(
                f"{wire.NUM_EXAMPLES} must be a positive integer, found {num_examples!r}"
            )
        return tensors, num_examples

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message], sites: Mapping[int, str]
    ) -> TrainOutcome:
        """Average the accepted replies, weighted by ``num-examples``.

        Replies are summed in the order of site names, in float64, so the aggregate
        does not depend on the order in which replies arrived.
        """
        accepted: list[tuple[str, dict[str, np.ndarray], int]] = []
        rejected: dict[str, str] = {}
        declined: dict[str, str] = {}
        site_metrics: dict[str, dict[str, float]] = {}
        bytes_received: dict[str, int] = {}

        for reply in replies:
            site = sites.get(reply.metadata.src_node_id, f"node-{reply.metadata.src_node_id}")
            if not reply.has_error():
                bytes_received[site] = sum(
                    r.count_bytes() for r in reply.content.array_records.values()
                )
                metrics = reply.content.metric_records.get(wire.METRICS)
                if metrics is not None and metrics.get(wire.DECLINED):
                    reasons = reply.content.config_records.get(wire.REASONS)
                    reason = str(reasons.get(wire.DECLINED)) if reasons else "no reason given"
                    declined[site] = reason
                    logger.warning("round %s site=%s declined: %s", server_round, site, reason)
                    continue
            try:
                tensors, num_examples = self.validate_reply(reply)
            except ValueError as error:
                rejected[site] = str(error)
                logger.warning("round %s site=%s reply rejected: %s", server_round, site, error)
                continue
            metrics = reply.content.metric_records[wire.METRICS]
            site_metrics[site] = {
                k: float(v) for k, v in metrics.items() if isinstance(v, int | float)
            }
            accepted.append((site, tensors, num_examples))

        accepted.sort(key=lambda item: item[0])
        if len(accepted) < self.min_sites:
            return TrainOutcome(
                None, [a[0] for a in accepted], rejected, declined, site_metrics, bytes_received
            )

        total = float(sum(n for _, _, n in accepted))
        aggregate: dict[str, np.ndarray] = {}
        for name, shape in self.trainable_shapes.items():
            acc = np.zeros(shape, dtype=np.float64)
            for _, tensors, num_examples in accepted:
                acc += tensors[name].astype(np.float64) * (num_examples / total)
            aggregate[name] = acc.astype(accepted[0][1][name].dtype)
        return TrainOutcome(
            aggregate, [a[0] for a in accepted], rejected, declined, site_metrics, bytes_received
        )
