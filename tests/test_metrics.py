"""Metrics against independent references, undefined cases and the accuracy matrix."""

from __future__ import annotations

import csv
import io
import itertools
import json

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu

from unicon_model.evaluation import TaskEvaluator, primary_metric
from unicon_model.metrics import (
    AccuracyMatrix,
    MetricValue,
    accuracy,
    binary_auc,
    concordance_index,
    dice_per_class,
    multiclass_auc,
)
from unicon_model.spec import TaskSpec


def brute_force_c_index(risk: np.ndarray, times: np.ndarray, events: np.ndarray) -> float:
    concordant, pairs = 0.0, 0
    for i, j in itertools.permutations(range(len(risk)), 2):
        if events[i] == 1 and times[i] < times[j]:
            pairs += 1
            if risk[i] > risk[j]:
                concordant += 1.0
            elif risk[i] == risk[j]:
                concordant += 0.5
    return concordant / pairs


def test_metrics_binary_auc_matches_mann_whitney() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=60)
    # Rounded scores create ties, which both formulas count as one half.
    scores = np.round(rng.normal(size=60) + labels, 1)

    result = binary_auc(scores, labels)

    statistic = mannwhitneyu(scores[labels == 1], scores[labels == 0]).statistic
    expected = statistic / ((labels == 1).sum() * (labels == 0).sum())
    assert result.value == pytest.approx(expected, abs=1e-12)


def test_metrics_auc_hand_example() -> None:
    # Pairs (positive, negative): (0.8, 0.1) 1, (0.8, 0.4) 1, (0.4, 0.1) 1, (0.4, 0.4) 0.5.
    assert binary_auc([0.1, 0.4, 0.4, 0.8], [0, 0, 1, 1]).value == pytest.approx(3.5 / 4)


def test_metrics_auc_undefined_with_one_class() -> None:
    result = binary_auc(torch.tensor([0.2, 0.9]), torch.tensor([1, 1]))

    assert result.value is None
    assert result.reason == "AUC undefined: only positives present"


def test_metrics_multiclass_auc_is_macro_one_vs_rest() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, size=45)
    probabilities = rng.dirichlet(np.ones(3), size=45)

    result = multiclass_auc(probabilities, labels)

    expected = np.mean([
        mannwhitneyu(probabilities[labels == k, k], probabilities[labels != k, k]).statistic
        / ((labels == k).sum() * (labels != k).sum())
        for k in range(3)
    ])
    assert result.value == pytest.approx(expected, abs=1e-12)
    assert multiclass_auc(probabilities[labels == 2], labels[labels == 2]).value is None


def test_metrics_accuracy_values() -> None:
    assert accuracy([1, 0, 2, 2], [1, 1, 2, 0]).value == pytest.approx(0.5)
    assert accuracy([], []).reason == "accuracy undefined: no samples"


def test_metrics_c_index_matches_brute_force() -> None:
    rng = np.random.default_rng(2)
    times = rng.integers(1, 15, size=40).astype(float)  # tied times
    events = rng.integers(0, 2, size=40)
    risk = np.round(-times / 10 + rng.normal(size=40), 1)  # tied risks

    result = concordance_index(risk, times, events)

    assert result.value == pytest.approx(brute_force_c_index(risk, times, events), abs=1e-12)


def test_metrics_c_index_undefined_without_pairs() -> None:
    all_censored = concordance_index([0.1, 0.5, 0.9], [10.0, 20.0, 30.0], [0, 0, 0])
    equal_times = concordance_index([0.1, 0.5], [10.0, 10.0], [1, 1])

    assert all_censored.value is None
    assert all_censored.reason == "C-index undefined: no comparable pairs"
    assert equal_times.value is None


def test_metrics_dice_per_class_conventions() -> None:
    target = torch.zeros(4, 4, 4, dtype=torch.long)
    prediction = torch.zeros(4, 4, 4, dtype=torch.long)
    target[0, :2, :2] = 1  # 4 voxels of class 1
    prediction[0, :2, :1] = 1  # 2 of them predicted
    prediction[3, 0, 0] = 2  # class 2 predicted but absent from the truth

    scores = dice_per_class(prediction, target, num_classes=4)

    assert scores[1] == pytest.approx(2 * 2 / (2 + 4))
    assert scores[2] == 0.0
    assert 3 not in scores  # empty prediction and empty truth: left out


def test_metrics_segmentation_evaluator_skips_empty_cases() -> None:
    spec = TaskSpec("ct_seg", "segmentation", "ct", num_classes=3)
    evaluator = TaskEvaluator(spec)
    label = torch.zeros(2, 1, 4, 4, 4, dtype=torch.long)
    label[0, 0, 0, :2, :2] = 1
    output = torch.zeros(2, 3, 4, 4, 4)
    output[:, 0] = 1.0  # predicts background everywhere
    output[0, 1, 0, :2, :2] = 2.0  # perfect class 1 on case 0; case 1 is empty and empty

    evaluator.update(output, {"label": label})
    metrics = evaluator.compute()

    assert metrics["dice_class_1"].value == pytest.approx(1.0)
    assert metrics["dice_class_2"].value is None
    assert metrics["dice"].value == pytest.approx(1.0)
    assert primary_metric(spec.kind) == "dice"


def test_metrics_evaluator_without_samples_is_undefined() -> None:
    evaluator = TaskEvaluator(TaskSpec("ct_prog", "prognosis", "ct"))

    assert evaluator.compute() == {"c_index": MetricValue(None, "no samples evaluated")}


def hand_matrix() -> AccuracyMatrix:
    matrix = AccuracyMatrix(metric="auc")
    for stage, task in (("s1", "a"), ("s2", "b"), ("s3", "c")):
        matrix.add_stage(stage, task)
    matrix.set("s1", "a", 0.9)
    matrix.set("s2", "a", 0.8)
    matrix.set("s2", "b", 0.7)
    matrix.set("s3", "a", 0.6)
    matrix.set("s3", "b", 0.75)
    matrix.set("s3", "c", 0.5)
    return matrix


def test_metrics_accuracy_matrix_hand_table() -> None:
    matrix = hand_matrix()

    forgetting = matrix.forgetting()

    assert matrix.average_final().value == pytest.approx((0.6 + 0.75 + 0.5) / 3)
    # ((0.6 - 0.9) + (0.75 - 0.7)) / 2
    assert matrix.backward_transfer().value == pytest.approx(-0.125)
    assert forgetting["a"].value == pytest.approx(0.3)  # max(0.9, 0.8) - 0.6
    assert forgetting["b"].value == pytest.approx(-0.05)  # 0.7 - 0.75
    assert forgetting["c"].value is None
    assert matrix.average_forgetting().value == pytest.approx(0.125)
    assert matrix.get("s1", "b").reason == "not evaluated"


def test_metrics_accuracy_matrix_leaves_out_undefined() -> None:
    matrix = hand_matrix()
    matrix.set("s3", "b", MetricValue.undefined("AUC undefined: only negatives present"))

    assert matrix.backward_transfer().value == pytest.approx(-0.3)
    assert matrix.forgetting()["b"].value is None
    assert matrix.average_final().value == pytest.approx((0.6 + 0.5) / 2)


def test_metrics_accuracy_matrix_single_stage_undefined() -> None:
    matrix = AccuracyMatrix()
    matrix.add_stage("s1", "a")
    matrix.set("s1", "a", 0.8)

    assert matrix.backward_transfer().reason == "backward transfer needs at least two stages"
    assert matrix.average_final().value == pytest.approx(0.8)


def test_metrics_matrix_rows_round_trip() -> None:
    matrix = hand_matrix()
    matrix.set("s3", "b", MetricValue.undefined("AUC undefined: only negatives present"))
    rows = matrix.to_rows()

    from_json = AccuracyMatrix.from_rows(json.loads(json.dumps(rows)))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    from_csv = AccuracyMatrix.from_rows(list(csv.DictReader(io.StringIO(buffer.getvalue()))))

    assert len(rows) == 9
    for restored in (from_json, from_csv):
        assert restored.stages == ["s1", "s2", "s3"]
        assert restored.trained == ["a", "b", "c"]
        assert restored.get("s2", "a").value == pytest.approx(0.8)
        assert restored.get("s3", "b").reason == "AUC undefined: only negatives present"
        assert restored.backward_transfer() == matrix.backward_transfer()
