"""Tests of the site's audit log and of the guard on replies."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array

from client.audit import (
    AuditLog,
    ReplyRejected,
    check_reply,
    summarize_audit,
    tensor_digest,
)

SPEC = {
    "heads.ct_cls.weight": (2, 8),
    "heads.ct_cls.bias": (2,),
    "adapters.ct_cls.down": (4, 8, 1, 1, 1),
}


def reply_arrays() -> dict[str, np.ndarray]:
    generator = np.random.default_rng(0)
    return {
        "heads.ct_cls.weight": generator.standard_normal((2, 8)).astype(np.float32),
        "heads.ct_cls.bias": np.zeros(2, dtype=np.float32),
        "adapters.ct_cls.down": generator.standard_normal((4, 8, 1, 1, 1)).astype(np.float32),
    }


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------
# Audit log
# ---------------------------------------------------------------------------------------


def test_audit_append_writes_record(tmp_path: Path) -> None:
    arrays = reply_arrays()
    metrics: dict[str, int | float | list[float]] = {
        "num-examples": 12,
        "ct_cls.loss": 0.5,
        "ct_cls.per_class": [0.25, 0.75],
    }

    AuditLog(tmp_path).append("run-1", "ct_cls", 3, "train.stage", arrays, metrics)

    (record,) = read_lines(tmp_path / "audit.jsonl")
    assert record["run_id"] == "run-1"
    assert record["stage"] == "ct_cls"
    assert record["round"] == 3
    assert record["message_type"] == "train.stage"
    assert record["time"].endswith("+00:00")
    assert record["metrics"] == metrics
    assert [t["name"] for t in record["tensors"]] == sorted(arrays)
    weight = next(t for t in record["tensors"] if t["name"] == "heads.ct_cls.weight")
    assert weight["shape"] == [2, 8]
    assert weight["dtype"] == "<f4"
    assert weight["bytes"] == 64
    assert weight["sha256"] == hashlib.sha256(arrays["heads.ct_cls.weight"].tobytes()).hexdigest()
    assert record["total_bytes"] == 64 + 8 + 128


def test_audit_reply_digest_follows_documented_layout(tmp_path: Path) -> None:
    arrays = reply_arrays()
    lines = ""
    for name in sorted(arrays):
        array = arrays[name]
        shape = "x".join(str(size) for size in array.shape)
        lines += f"{name} <f4 {shape} {hashlib.sha256(array.tobytes()).hexdigest()}\n"
    expected = hashlib.sha256(lines.encode()).hexdigest()

    record = AuditLog(tmp_path).append("run-1", "ct_cls", 1, "train.stage", arrays, {})

    assert record["sha256"] == expected
    assert tensor_digest(arrays) == expected
    changed = dict(arrays, **{"heads.ct_cls.bias": np.ones(2, dtype=np.float32)})
    assert tensor_digest(changed) != expected


def test_audit_append_accepts_flower_arrays(tmp_path: Path) -> None:
    arrays = reply_arrays()
    flower_arrays = {name: Array(value) for name, value in arrays.items()}

    record = AuditLog(tmp_path).append("run-1", "ct_cls", 1, "train.stage", flower_arrays, {})

    assert record["sha256"] == tensor_digest(arrays)


def test_audit_non_finite_metric_stays_valid_json(tmp_path: Path) -> None:
    AuditLog(tmp_path).append("run-1", "ct_cls", 1, "evaluate.tasks", {}, {"auc": math.nan})

    (record,) = read_lines(tmp_path / "audit.jsonl")
    assert record["metrics"] == {"auc": "nan"}
    assert record["tensors"] == []
    assert record["total_bytes"] == 0


def test_audit_torn_line_is_reported(tmp_path: Path) -> None:
    log = AuditLog(tmp_path)
    log.append("run-1", "ct_cls", 1, "train.stage", reply_arrays(), {"num-examples": 4})
    with open(log.path, "a", encoding="utf-8") as handle:
        handle.write('{"time": "2026-01-01T00:00')
    log.append("run-1", "ct_cls", 2, "train.stage", reply_arrays(), {"num-examples": 4})

    summary = summarize_audit(tmp_path)

    assert summary.replies == 2
    assert summary.unreadable_lines == [2]
    assert "1 unreadable lines (line 2)" in summary.to_text()


# ---------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------


def test_summarize_audit_missing_log(tmp_path: Path) -> None:
    summary = summarize_audit(tmp_path)

    assert not summary.exists
    assert summary.replies == 0
    assert summary.to_text() == (
        f"No audit log at {tmp_path / 'audit.jsonl'}: this site has sent no reply yet."
    )
    assert summary.to_dict()["exists"] is False


def test_summarize_audit_empty_log(tmp_path: Path) -> None:
    (tmp_path / "audit.jsonl").write_text("")

    summary = summarize_audit(tmp_path)

    assert summary.exists
    assert summary.to_text() == f"The audit log {tmp_path / 'audit.jsonl'} contains no reply."


def test_summarize_audit_totals_per_type_and_stage(tmp_path: Path) -> None:
    log = AuditLog(tmp_path)
    big = {"heads.ct_seg.decoder": np.zeros((64, 32), dtype=np.float32)}
    log.append("run-1", "ct_cls", 1, "train.stage", reply_arrays(), {"num-examples": 4})
    log.append("run-1", "ct_cls", 2, "train.stage", reply_arrays(), {"num-examples": 4, "eps": 1.5})
    log.append("run-2", "ct_seg", 1, "train.stage", big, {"num-examples": 2})
    log.append("run-2", "ct_seg", 0, "evaluate.tasks", {}, {"ct_seg.dice": 0.7})

    summary = summarize_audit(tmp_path)
    text = summary.to_text()
    data = summary.to_dict()

    assert summary.replies == 4
    assert summary.total_bytes == 2 * 200 + 8192
    assert [(g.message_type, g.stage) for g in summary.groups] == [
        ("evaluate.tasks", "ct_seg"),
        ("train.stage", "ct_cls"),
        ("train.stage", "ct_seg"),
    ]
    cls_group = summary.groups[1]
    assert cls_group.replies == 2
    assert cls_group.tensors == 6
    assert cls_group.total_bytes == 400
    assert cls_group.largest_tensor is not None
    assert cls_group.largest_tensor.name == "adapters.ct_cls.down"
    assert cls_group.metric_names == {"num-examples", "eps"}

    assert "train.stage, stage ct_cls:\n  replies 2, tensors 6, bytes 400 B\n" in text
    assert "  largest tensor adapters.ct_cls.down (4x8x1x1x1, 128 B, round 1)" in text
    assert "  metrics: eps, num-examples" in text
    assert "bytes 8192 B (8.0 KiB)" in text
    assert "evaluate.tasks, stage ct_seg:\n  replies 1, tensors 0, bytes 0 B\n  metrics:" in text
    assert "4 replies, 8592 B (8.4 KiB) of tensors" in text

    assert data["replies"] == 4
    assert data["groups"][2]["largest_tensor"] == {
        "name": "heads.ct_seg.decoder",
        "shape": [64, 32],
        "bytes": 8192,
        "round": 1,
        "run_id": "run-2",
    }
    assert data["groups"][0]["largest_tensor"] is None
    assert json.loads(json.dumps(data)) == data


# ---------------------------------------------------------------------------------------
# Reply guard
# ---------------------------------------------------------------------------------------


def test_check_reply_accepts_valid_reply() -> None:
    metrics = {"num-examples": 12, "loss": 0.25, "dice": [0.5, 0.75], "counts": [1, 2], "e": []}

    check_reply(reply_arrays(), SPEC, metrics)
    check_reply({"heads.ct_cls.bias": ((2,), "float32")}, SPEC, {})
    check_reply({"heads.ct_cls.bias": Array(np.zeros(2, dtype=np.float32))}, SPEC, {})


def test_check_reply_unknown_tensor_rejected() -> None:
    arrays = {"heads.ct_cls.wieght": np.zeros((2, 8), dtype=np.float32)}

    with pytest.raises(ReplyRejected) as caught:
        check_reply(arrays, SPEC, {})

    assert caught.value.problems == [
        "tensor 'heads.ct_cls.wieght' is not in the model spec "
        "(closest spec name: 'heads.ct_cls.weight')"
    ]


def test_check_reply_shape_mismatch_rejected() -> None:
    arrays = {"heads.ct_cls.weight": np.zeros((8, 2), dtype=np.float32)}

    with pytest.raises(ReplyRejected) as caught:
        check_reply(arrays, SPEC, {})

    assert caught.value.problems == [
        "tensor 'heads.ct_cls.weight' has shape (8, 2), but the model spec has (2, 8)"
    ]


def test_check_reply_declared_shape_mismatch_rejected() -> None:
    with pytest.raises(ReplyRejected, match=r"has shape \(3,\), but the model spec has \(2,\)"):
        check_reply({"heads.ct_cls.bias": ((3,), "float32")}, SPEC, {})


@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf])
def test_check_reply_non_finite_tensor_rejected(bad_value: float) -> None:
    arrays = reply_arrays()
    arrays["heads.ct_cls.weight"][1, 3] = bad_value
    arrays["heads.ct_cls.weight"][0, 0] = bad_value

    with pytest.raises(ReplyRejected) as caught:
        check_reply(arrays, SPEC, {})

    assert caught.value.problems == ["tensor 'heads.ct_cls.weight' has 2 NaN or infinite values"]


def test_check_reply_string_tensor_rejected() -> None:
    arrays = {"heads.ct_cls.bias": np.array(["a", "b"])}

    with pytest.raises(ReplyRejected, match="not numeric"):
        check_reply(arrays, SPEC, {})


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        ({"site": "hospital-a"}, "metric 'site' is the string 'hospital-a'; strings are never"),
        ({"loss": math.nan}, "metric 'loss' is nan: not finite"),
        ({"loss": math.inf}, "metric 'loss' is inf: not finite"),
        ({"ok": True}, "metric 'ok' is True: a bool, not an int or a float"),
        ({"count": 2**64}, "an int outside the range [-2**63, 2**64 - 1]"),
        ({"count": -(2**63) - 1}, "an int outside the range [-2**63, 2**64 - 1]"),
        ({"loss": None}, "metric 'loss' is None: a NoneType, not an int or a float"),
        ({"dice": [0.5, 1]}, "must be a list of ints or a list of floats"),
        ({"ids": ["case_001"]}, "must be a list of ints or a list of floats"),
        ({"dice": [0.5, math.nan]}, "metric 'dice' contains nan: not finite"),
        ({"loss": np.float32(0.5)}, "a float32, not an int or a float"),
        ({3: 0.5}, "metric name 3 is not a string"),
    ],
)
def test_check_reply_bad_metric_rejected(metrics: dict[Any, Any], expected: str) -> None:
    with pytest.raises(ReplyRejected) as caught:
        check_reply({}, SPEC, metrics)

    assert len(caught.value.problems) == 1
    assert expected in caught.value.problems[0]


def test_check_reply_lists_every_problem() -> None:
    arrays = {
        "unknown": np.zeros(1, dtype=np.float32),
        "heads.ct_cls.bias": np.zeros(3, dtype=np.float32),
    }

    with pytest.raises(ReplyRejected) as caught:
        check_reply(arrays, SPEC, {"path": "/data/ct/case_001.nii.gz"})

    assert len(caught.value.problems) == 3
    assert str(caught.value).startswith("reply rejected, nothing was sent: ")
