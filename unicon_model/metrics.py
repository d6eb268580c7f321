"""Metrics with explicit undefined values: Dice, AUC, accuracy, Harrell's C-index, and the
continual-learning accuracy matrix with backward transfer and forgetting.

A metric that cannot be computed on the data at hand (an AUC with one class present, a
C-index without comparable pairs) is a :class:`MetricValue` with ``value=None`` and a
``reason``. Averages leave undefined values out and never produce NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from torch import Tensor

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class MetricValue:
    """A metric value, or ``None`` with the reason it is undefined."""

    value: float | None
    reason: str | None = None

    @property
    def defined(self) -> bool:
        """Whether the metric has a value."""
        return self.value is not None

    @classmethod
    def undefined(cls, reason: str) -> MetricValue:
        """Build an undefined value with its reason."""
        return cls(None, reason)

    def to_dict(self) -> dict[str, Any]:
        """Return ``{"value": float | None, "reason": str | None}``."""
        return {"value": self.value, "reason": self.reason}


def mean_defined(values: Iterable[MetricValue], description: str) -> MetricValue:
    """Average the defined values, or return undefined when none is defined.

    ``description`` names the values in the reason, for example ``"final scores"``.
    """
    numbers = [value.value for value in values if value.value is not None]
    if not numbers:
        return MetricValue.undefined(f"no defined {description} to average")
    return MetricValue(float(np.mean(numbers)))


def _as_numpy(values: Tensor | npt.ArrayLike) -> FloatArray:
    if isinstance(values, Tensor):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


# Segmentation


def dice_per_class(prediction: Tensor, target: Tensor, num_classes: int) -> dict[int, float]:
    """Dice of each foreground class for one case.

    Convention for empty masks: when a class is absent from both the prediction and the
    truth, Dice is undefined and the class is left out of the result for that case. A
    class present in only one of them scores 0.

    Parameters
    ----------
    prediction, target : Tensor
        Integer class maps of one case, same shape (for example ``(D, H, W)``).
    num_classes : int
        Classes including background (class 0, which is not scored).

    Returns
    -------
    dict of int to float
        Class index to Dice, only for classes present in the prediction or the truth.
    """
    if prediction.shape != target.shape:
        raise ValueError(
            f"dice_per_class: prediction shape {tuple(prediction.shape)} differs from "
            f"target shape {tuple(target.shape)}."
        )
    scores: dict[int, float] = {}
    for cls in range(1, num_classes):
        predicted = prediction == cls
        truth = target == cls
        total = int(predicted.sum()) + int(truth.sum())
        if total == 0:
            continue
        overlap = int((predicted & truth).sum())
        scores[cls] = 2.0 * overlap / total
    return scores


# Classification


def _average_ranks(values: FloatArray) -> FloatArray:
    """Ranks 1..n with tied values sharing their average rank."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    start = 0
    while start < len(values):
        stop = start
        while stop + 1 < len(values) and sorted_values[stop + 1] == sorted_values[start]:
            stop += 1
        ranks[order[start : stop + 1]] = (start + stop) / 2.0 + 1.0
        start = stop + 1
    return ranks


def binary_auc(scores: Tensor | npt.ArrayLike, labels: Tensor | npt.ArrayLike) -> MetricValue:
    """Area under the ROC curve of scores for labels in {0, 1}.

    Computed with the rank (Mann-Whitney) formula ``(R_1 - n_1 (n_1 + 1) / 2) / (n_1 n_0)``,
    where ``R_1`` is the rank sum of the positives and ties share average ranks (a tied
    positive-negative pair counts one half). Undefined unless both classes are present.
    """
    score_array = _as_numpy(scores).reshape(-1)
    label_array = _as_numpy(labels).reshape(-1)
    if score_array.shape != label_array.shape:
        raise ValueError(
            f"binary_auc: {score_array.size} scores but {label_array.size} labels."
        )
    positives = label_array == 1
    num_positive = int(positives.sum())
    num_negative = int((label_array == 0).sum())
    if num_positive + num_negative != label_array.size:
        raise ValueError("binary_auc: labels must be 0 or 1.")
    if num_positive == 0 or num_negative == 0:
        present = "positives" if num_positive else "negatives"
        return MetricValue.undefined(f"AUC undefined: only {present} present")
    ranks = _average_ranks(score_array)
    rank_sum = float(ranks[positives].sum())
    auc = (rank_sum - num_positive * (num_positive + 1) / 2.0) / (num_positive * num_negative)
    return MetricValue(auc)


def multiclass_auc(
    probabilities: Tensor | npt.ArrayLike, labels: Tensor | npt.ArrayLike
) -> MetricValue:
    """Macro one-vs-rest AUC for ``probabilities`` ``(N, K)`` and labels in ``0..K-1``.

    With ``K == 2`` this is the binary AUC of column 1. Classes absent from the labels are
    left out of the macro average; the AUC is undefined with fewer than two classes present.
    """
    probability_array = _as_numpy(probabilities)
    label_array = _as_numpy(labels).reshape(-1).astype(np.int64)
    if probability_array.ndim != 2 or probability_array.shape[0] != label_array.size:
        raise ValueError(
            f"multiclass_auc: expected probabilities (N, K) with N = {label_array.size}; "
            f"got shape {probability_array.shape}."
        )
    num_classes = probability_array.shape[1]
    if num_classes == 2:
        return binary_auc(probability_array[:, 1], label_array)
    present = sorted(set(label_array.tolist()))
    if len(present) < 2:
        return MetricValue.undefined(f"AUC undefined: only class {present} present")
    per_class = [
        binary_auc(probability_array[:, cls], (label_array == cls).astype(np.float64))
        for cls in present
        if cls < num_classes
    ]
    return mean_defined(per_class, "one-vs-rest AUCs")


def accuracy(predicted: Tensor | npt.ArrayLike, labels: Tensor | npt.ArrayLike) -> MetricValue:
    """Fraction of predicted class indices equal to the labels; undefined without samples."""
    predicted_array = _as_numpy(predicted).reshape(-1)
    label_array = _as_numpy(labels).reshape(-1)
    if predicted_array.size == 0:
        return MetricValue.undefined("accuracy undefined: no samples")
    return MetricValue(float((predicted_array == label_array).mean()))


# Survival


def concordance_index(
    risk: Tensor | npt.ArrayLike, times: Tensor | npt.ArrayLike, events: Tensor | npt.ArrayLike
) -> MetricValue:
    """Harrell's C-index: the fraction of comparable pairs ordered correctly by risk.

    A pair ``(i, j)`` is comparable when ``t_i < t_j`` and patient ``i`` had the event. It is
    concordant when ``risk_i > risk_j`` and counts one half when the risks tie. Pairs with
    equal times are not comparable. Undefined without comparable pairs.
    """
    risk_array = _as_numpy(risk).reshape(-1)
    time_array = _as_numpy(times).reshape(-1)
    event_array = _as_numpy(events).reshape(-1)
    if not risk_array.size == time_array.size == event_array.size:
        raise ValueError(
            f"concordance_index: sizes differ (risk {risk_array.size}, time {time_array.size}, "
            f"event {event_array.size})."
        )
    # comparable[i, j]: i had the event before j's time; an O(N^2) table is fine up to a
    # few thousand patients.
    comparable = (time_array[:, None] < time_array[None, :]) & (event_array[:, None] == 1)
    num_pairs = int(comparable.sum())
    if num_pairs == 0:
        return MetricValue.undefined("C-index undefined: no comparable pairs")
    higher = risk_array[:, None] > risk_array[None, :]
    tied = risk_array[:, None] == risk_array[None, :]
    concordant = float((comparable & higher).sum()) + 0.5 * float((comparable & tied).sum())
    return MetricValue(concordant / num_pairs)


# Continual learning


class AccuracyMatrix:
    """Scores of every task after every stage: ``R[l, i]`` is task ``i`` after stage ``l``.

    Rows are stages in the order they were added, and stage ``l`` trains task
    ``trained[l]``. A task's diagonal entry ``R[i, i]`` is its score right after the first
    stage that trained it. ``T`` below is the last stage added. Undefined entries (task not evaluated,
    metric undefined) are left out of every average, with the reason kept.

    Parameters
    ----------
    metric : str, default "score"
        Name of the metric in the table, for reports and rows.
    """

    def __init__(self, metric: str = "score") -> None:
        self.metric = metric
        self.stages: list[str] = []
        self.trained: list[str] = []
        self.tasks: list[str] = []
        self._values: dict[tuple[str, str], MetricValue] = {}

    def add_stage(self, stage: str, trained_task: str) -> None:
        """Append a stage row; ``trained_task`` is the task this stage trained."""
        if stage in self.stages:
            raise ValueError(f"AccuracyMatrix: stage {stage!r} was already added.")
        self.stages.append(stage)
        self.trained.append(trained_task)
        if trained_task not in self.tasks:
            self.tasks.append(trained_task)

    def set(self, stage: str, task: str, value: MetricValue | float | None) -> None:
        """Record task ``task``'s score after ``stage`` (a float, or None for undefined)."""
        if stage not in self.stages:
            raise ValueError(
                f"AccuracyMatrix: unknown stage {stage!r}; add it first with add_stage()."
            )
        if not isinstance(value, MetricValue):
            value = MetricValue(None, "not evaluated") if value is None else MetricValue(value)
        if value.value is not None and not math.isfinite(value.value):
            value = MetricValue.undefined(f"non-finite value {value.value}")
        if task not in self.tasks:
            self.tasks.append(task)
        self._values[(stage, task)] = value

    def get(self, stage: str, task: str) -> MetricValue:
        """Return ``R[stage, task]``; undefined when it was never recorded."""
        return self._values.get((stage, task), MetricValue.undefined("not evaluated"))

    def _diagonal_stage(self, task: str) -> str | None:
        for stage, trained in zip(self.stages, self.trained, strict=True):
            if trained == task:
                return stage
        return None

    def _learned_before_last(self) -> list[str]:
        """Tasks trained at some stage before the last one, in training order."""
        tasks: list[str] = []
        for task in self.trained[:-1]:
            if task not in tasks and task != self.trained[-1]:
                tasks.append(task)
        return tasks

    def average_final(self) -> MetricValue:
        """Mean of ``R[T, i]`` over the tasks trained so far (average accuracy)."""
        if not self.stages:
            return MetricValue.undefined("no stages recorded")
        last = self.stages[-1]
        trained = list(dict.fromkeys(self.trained))
        return mean_defined((self.get(last, task) for task in trained), "final scores")

    def backward_transfer(self) -> MetricValue:
        """Backward transfer: mean over earlier tasks of ``R[T, i] - R[i, i]``.

        As defined by Lopez-Paz and Ranzato ("Gradient Episodic Memory for Continual
        Learning", NeurIPS 2017); negative values mean forgetting. Undefined with fewer than
        two stages or when no pair of entries is defined.
        """
        if len(self.stages) < 2:
            return MetricValue.undefined("backward transfer needs at least two stages")
        last = self.stages[-1]
        differences: list[MetricValue] = []
        for task in self._learned_before_last():
            final = self.get(last, task).value
            diagonal_stage = self._diagonal_stage(task)
            initial = self.get(diagonal_stage, task).value if diagonal_stage else None
            if final is not None and initial is not None:
                differences.append(MetricValue(final - initial))
        return mean_defined(differences, "score differences")

    def forgetting(self) -> dict[str, MetricValue]:
        """Forgetting of each task: ``max over stages l in [i, T) of R[l, i]`` minus ``R[T, i]``.

        As defined by Chaudhry et al. ("Riemannian Walk for Incremental Learning",
        ECCV 2018). The task trained at the last stage has no forgetting yet (undefined).
        """
        result: dict[str, MetricValue] = {}
        if not self.stages:
            return result
        last = self.stages[-1]
        for task in dict.fromkeys(self.trained):
            if task not in self._learned_before_last():
                result[task] = MetricValue.undefined("task trained at the last stage")
                continue
            first = self.stages.index(str(self._diagonal_stage(task)))
            earlier = [self.get(stage, task).value for stage in self.stages[first:-1]]
            earlier_defined = [value for value in earlier if value is not None]
            final = self.get(last, task).value
            if final is None or not earlier_defined:
                result[task] = MetricValue.undefined("scores before or after are undefined")
                continue
            result[task] = MetricValue(max(earlier_defined) - final)
        return result

    def average_forgetting(self) -> MetricValue:
        """Mean of the defined per-task forgetting values."""
        return mean_defined(self.forgetting().values(), "forgetting values")

    def to_rows(self) -> list[dict[str, Any]]:
        """Return long-format rows, one per stage and task (JSON- and CSV-ready).

        Keys: ``stage``, ``stage_index``, ``trained_task``, ``task``, ``metric``, ``value``
        (float or None) and ``reason`` (str or None).
        """
        rows = []
        for index, (stage, trained) in enumerate(zip(self.stages, self.trained, strict=True)):
            for task in self.tasks:
                value = self.get(stage, task)
                rows.append(
                    {
                        "stage": stage,
                        "stage_index": index,
                        "trained_task": trained,
                        "task": task,
                        "metric": self.metric,
                        "value": value.value,
                        "reason": value.reason,
                    }
                )
        return rows

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, Any]]) -> AccuracyMatrix:
        """Rebuild a matrix from :meth:`to_rows` output, also after a CSV round trip.

        CSV readers give strings: an empty ``value`` or ``reason`` reads as None.
        """
        metric = str(rows[0]["metric"]) if rows else "score"
        matrix = cls(metric)
        ordered = sorted(rows, key=lambda row: int(row["stage_index"]))
        for row in ordered:
            if row["stage"] not in matrix.stages:
                matrix.add_stage(str(row["stage"]), str(row["trained_task"]))
        for row in ordered:
            raw_value = row.get("value")
            raw_reason = row.get("reason")
            value = None if raw_value in (None, "") else float(raw_value)
            reason = None if raw_reason in (None, "") else str(raw_reason)
            if row["task"] not in matrix.tasks:
                matrix.tasks.append(str(row["task"]))
            matrix._values[(str(row["stage"]), str(row["task"]))] = MetricValue(value, reason)
        return matrix

