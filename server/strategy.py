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

Optional central DP (a stage's ``central_dp`` in the curriculum) follows DP-FedAvg
with fixed clipping (McMahan et al., "Learning Differentially Private Recurrent
Language Models", ICLR 2018, arXiv 1710.06963): each site's update, its tensors minus
the round's starting values, is clipped to an L2 norm of ``clipping_norm`` over all
trainable tensors, and Gaussian noise is added to the weighted mean. The helpers of
``flwr.supercore.differential_privacy`` (Flower 1.42) do the clipping and the noise.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.differential_privacy import (
    add_gaussian_noise_inplace,
    compute_clip_model_update,
    get_norm,
)
from opacus.accountants import RDPAccountant

from server.curriculum import CentralDPSettings
from unicon_model import wire
from unicon_model.log import get_logger

logger = get_logger(__name__)

# NOTE: the curriculum's central_dp block has no delta key yet, so every stage reports
# its central epsilon at this delta. It must stay below 1 / (number of sites).
CENTRAL_DP_DELTA = 1.0e-5


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
    """Outcome of one training round.

    ``central_dp`` is set when central DP released the round's aggregate: the noise
    multiplier, clipping norm, noise standard deviation, and each accepted site's
    update norm before clipping.
    """

    arrays: dict[str, np.ndarray] | None
    accepted: list[str]
    rejected: dict[str, str]
    declined: dict[str, str]
    site_metrics: dict[str, dict[str, float]]
    bytes_received: dict[str, int]
    central_dp: dict[str, Any] | None = None


def clip_site_update(
    tensors: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray], clipping_norm: float
) -> tuple[dict[str, np.ndarray], float]:
    """Clip a site's update to an L2 norm of ``clipping_norm`` over all its tensors.

    Parameters
    ----------
    tensors : Mapping[str, np.ndarray]
        The site's trained values, by parameter name.
    start : Mapping[str, np.ndarray]
        The values the round started from, with the same names and shapes.
    clipping_norm : float
        Largest L2 norm of the update, above 0.

    Returns
    -------
    tuple
        ``(clipped, norm)``: ``start`` plus the update scaled by
        ``min(1, clipping_norm / norm)``, and the update's norm before clipping.
    """
    names = sorted(tensors)
    trained = [np.array(tensors[name], dtype=np.float64) for name in names]
    reference = [np.asarray(start[name], dtype=np.float64) for name in names]
    norm = get_norm([a - b for a, b in zip(trained, reference, strict=True)])
    if norm > 0.0:
        # Flower's helper divides by the norm, which is 0 for a site that did not move.
        compute_clip_model_update(trained, reference, clipping_norm)
    clipped = {
        name: value.astype(np.asarray(tensors[name]).dtype)
        for name, value in zip(names, trained, strict=True)
    }
    return clipped, norm


def central_noise_std(
    noise_multiplier: float, clipping_norm: float, weights: Sequence[float]
) -> float:
    """Return the standard deviation of the noise added to a weighted mean of clipped updates.

    One site can move the weighted mean by at most its weight times ``clipping_norm``
    when the weights are held fixed, so the noise is ``noise_multiplier`` times the
    largest such change. With equal weights ``1/m`` this is Flower's
    ``noise_multiplier * clipping_norm / m``.

    NOTE: the weights come from each site's ``num-examples`` and are treated as public;
    the guarantee does not cover what the counts themselves reveal.
    """
    return float(noise_multiplier * clipping_norm * max(weights))


def central_dp_epsilon(noise_multiplier: float, releases: int, delta: float) -> float | None:
    """Compute the site-level epsilon of ``releases`` noisy aggregates with Opacus's RDP accountant.

    Every site takes part in every round, so the sampling rate is 1 and each released
    aggregate is one step. Returns 0.0 before the first release, and None when no finite
    epsilon exists (noise multiplier 0).
    """
    if releases == 0:
        return 0.0
    if noise_multiplier <= 0.0:
        return None
    accountant = RDPAccountant()
    accountant.history = [(float(noise_multiplier), 1.0, int(releases))]
    with warnings.catch_warnings():
        # The bound stays valid when the best order sits at the end of Opacus's range.
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        epsilon = float(accountant.get_epsilon(delta=delta))
    return epsilon if math.isfinite(epsilon) else None


class PartialFedAvg:
    """FedAvg over a named subset of the model's parameters.

    Parameters
    ----------
    trainable_shapes : Mapping[str, tuple[int, ...]]
        Name and shape of every tensor the stage trains; replies must match exactly.
    min_sites : int
        Fewest accepted replies with which a round still counts.
    central_dp : CentralDPSettings or None
        Clip each site's update and add Gaussian noise to the aggregate (see the
        module docstring); None aggregates the updates as sent.
    """

    def __init__(
        self,
        trainable_shapes: Mapping[str, tuple[int, ...]],
        min_sites: int,
        central_dp: CentralDPSettings | None = None,
    ) -> None:
        self.trainable_shapes = dict(trainable_shapes)
        self.min_sites = min_sites
        self.central_dp = central_dp
        # Values each round started from, by round, for clipping updates under central DP.
        self._round_start: dict[int, dict[str, np.ndarray]] = {}

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
        if self.central_dp is not None:
            self._round_start[server_round] = {
                name: np.array(array.numpy()) for name, array in arrays.items()
            }
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
                raise ValueError(f"tensor {name} contains non-finite values")
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
        start = self._round_start.pop(server_round, None)
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

        central: dict[str, Any] | None = None
        if self.central_dp is not None:
            accepted, central = self._clip_updates(server_round, accepted, start)

        total = float(sum(n for _, _, n in accepted))
        aggregate: dict[str, np.ndarray] = {}
        for name, shape in self.trainable_shapes.items():
            acc = np.zeros(shape, dtype=np.float64)
            for _, tensors, num_examples in accepted:
                acc += tensors[name].astype(np.float64) * (num_examples / total)
            aggregate[name] = acc.astype(accepted[0][1][name].dtype)

        if self.central_dp is not None and central is not None:
            weights = [num_examples / total for _, _, num_examples in accepted]
            std = central_noise_std(
                self.central_dp.noise_multiplier, self.central_dp.clipping_norm, weights
            )
            if std > 0.0:
                # NOTE: Flower's helper draws from NumPy's global generator, which is neither
                # cryptographically secure nor seeded by the curriculum.
                add_gaussian_noise_inplace([aggregate[name] for name in sorted(aggregate)], std)
            central["noise_std"] = std
            logger.info(
                "round %s central DP: updates clipped to %g, noise std %.4g on the aggregate",
                server_round,
                self.central_dp.clipping_norm,
                std,
            )
        return TrainOutcome(
            aggregate,
            [a[0] for a in accepted],
            rejected,
            declined,
            site_metrics,
            bytes_received,
            central,
        )

    def _clip_updates(
        self,
        server_round: int,
        accepted: list[tuple[str, dict[str, np.ndarray], int]],
        start: dict[str, np.ndarray] | None,
    ) -> tuple[list[tuple[str, dict[str, np.ndarray], int]], dict[str, Any]]:
        """Clip every accepted site's update against the values the round started from."""
        assert self.central_dp is not None
        if start is None:
            raise RuntimeError(
                f"round {server_round}: central DP needs the round's starting values, but "
                "configure_train was not called for this round"
            )
        clipped: list[tuple[str, dict[str, np.ndarray], int]] = []
        norms: dict[str, float] = {}
        for site, tensors, num_examples in accepted:
            values, norm = clip_site_update(tensors, start, self.central_dp.clipping_norm)
            clipped.append((site, values, num_examples))
            norms[site] = norm
        central = {
            "noise_multiplier": self.central_dp.noise_multiplier,
            "clipping_norm": self.central_dp.clipping_norm,
            "update_norms": norms,
            "clipped_sites": sorted(
                s for s, n in norms.items() if n > self.central_dp.clipping_norm
            ),
        }
        return clipped, central
