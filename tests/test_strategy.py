"""PartialFedAvg on hand-built Flower messages: weighting, rejection, too few sites."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from server.strategy import PartialFedAvg
from unicon_model import wire

SHAPES = {"heads.t.weight": (2, 3), "heads.t.bias": (2,)}


@pytest.fixture(autouse=True)
def task_identity() -> Iterator[None]:
    """Give Flower the run identity that a ServerApp process has, so messages can be built."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _reply(node_id: int, tensors: dict[str, np.ndarray], num_examples: int) -> Message:
    request = Message(
        content=RecordDict({wire.CONFIG: ConfigRecord({})}),
        message_type=wire.TRAIN_STAGE,
        dst_node_id=node_id,
    )
    # A reply needs the id the SuperLink gives a pushed message.
    request.metadata.__dict__["_message_id"] = f"m{node_id}"
    record = ArrayRecord()
    for name, value in tensors.items():
        record[name] = Array(value)
    content = RecordDict(
        {wire.TRAINABLE: record, wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: num_examples})}
    )
    reply = Message(content=content, reply_to=request)
    # A reply built here has no sender until the SuperLink routes it; set the site's node id.
    reply.metadata.__dict__["_src_node_id"] = node_id
    return reply


def _tensors(value: float) -> dict[str, np.ndarray]:
    return {name: np.full(shape, value, dtype=np.float32) for name, shape in SHAPES.items()}


SITES = {1: "site-a", 2: "site-b", 3: "site-c"}


def test_strategy_weights_by_num_examples() -> None:
    strategy = PartialFedAvg(SHAPES, min_sites=2)
    replies = [_reply(1, _tensors(1.0), 10), _reply(2, _tensors(4.0), 30)]

    outcome = strategy.aggregate_train(1, replies, SITES)

    assert outcome.arrays is not None
    expected = (1.0 * 10 + 4.0 * 30) / 40
    np.testing.assert_allclose(outcome.arrays["heads.t.weight"], np.full((2, 3), expected))
    assert outcome.accepted == ["site-a", "site-b"]
    assert outcome.rejected == {}


@pytest.mark.parametrize(
    ("tensors", "fragment"),
    [
        ({"heads.t.weight": np.zeros((2, 3), np.float32)}, "missing ['heads.t.bias']"),
        ({**_tensors(0.0), "backbone.x": np.zeros(1, np.float32)}, "unknown ['backbone.x']"),
        (
            {
                "heads.t.weight": np.zeros((3, 2), np.float32),
                "heads.t.bias": np.zeros(2, np.float32),
            },
            "shape (3, 2)",
        ),
        (
            {
                "heads.t.weight": np.full((2, 3), np.nan, np.float32),
                "heads.t.bias": np.zeros(2, np.float32),
            },
            "non-finite",
        ),
    ],
)
def test_strategy_rejects_malformed_reply(tensors: dict[str, np.ndarray], fragment: str) -> None:
    strategy = PartialFedAvg(SHAPES, min_sites=1)
    replies = [_reply(1, _tensors(2.0), 5), _reply(3, tensors, 5)]

    outcome = strategy.aggregate_train(1, replies, SITES)

    assert outcome.accepted == ["site-a"]
    assert fragment in outcome.rejected["site-c"]
    assert outcome.arrays is not None
    np.testing.assert_array_equal(outcome.arrays["heads.t.bias"], np.full(2, 2.0, np.float32))


def test_strategy_rejects_zero_examples() -> None:
    strategy = PartialFedAvg(SHAPES, min_sites=1)

    outcome = strategy.aggregate_train(1, [_reply(2, _tensors(1.0), 0)], SITES)

    assert outcome.arrays is None
    assert "num-examples" in outcome.rejected["site-b"]


def test_strategy_too_few_sites_gives_no_aggregate() -> None:
    strategy = PartialFedAvg(SHAPES, min_sites=3)

    outcome = strategy.aggregate_train(
        1, [_reply(1, _tensors(1.0), 4), _reply(2, _tensors(1.0), 4)], SITES
    )

    assert outcome.arrays is None
    assert outcome.accepted == ["site-a", "site-b"]
