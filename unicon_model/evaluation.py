"""Evaluation of one task on a data loader, with the task kind's metrics.

Classification reports ``auc`` and ``accuracy``, prognosis ``c_index``, segmentation
``dice`` (mean over foreground classes) and ``dice_class_<k>`` per class. Each value is
a :class:`~unicon_model.metrics.MetricValue`, undefined with a reason when the data
cannot define it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from torch import Tensor

from unicon_model.log import get_logger
from unicon_model.losses import (
    batch_value,
    class_probabilities,
    risk_score,
    segmentation_labels,
)
from unicon_model.metrics import (
    MetricValue,
    accuracy,
    concordance_index,
    dice_per_class,
    mean_defined,
    multiclass_auc,
)
from unicon_model.model import ModelInputError, UniconModel
from unicon_model.spec import TaskSpec

logger = get_logger(__name__)

_PRIMARY_METRIC = {"classification": "auc", "prognosis": "c_index", "segmentation": "dice"}


def primary_metric(kind: str) -> str:
    """Return the metric that ranks models for a task kind: ``auc``, ``c_index`` or ``dice``."""
    if kind not in _PRIMARY_METRIC:
        raise ValueError(
            f"primary_metric: unknown task kind {kind!r}; allowed values are "
            f"{', '.join(_PRIMARY_METRIC)}."
        )
    return _PRIMARY_METRIC[kind]


class TaskEvaluator:
    """Accumulate a task's outputs batch by batch and compute its metrics.

    Segmentation Dice is computed per case as batches arrive, so volumes are not kept.
    The reported ``dice`` averages, for each foreground class, the cases where that class
    is defined (present in prediction or truth), then averages the classes.

    Parameters
    ----------
    spec : TaskSpec
        The evaluated task.
    """

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec
        self.num_samples = 0
        self._scores: list[Tensor] = []
        self._labels: list[Tensor] = []
        self._times: list[Tensor] = []
        self._events: list[Tensor] = []
        self._dice_cases: list[dict[int, float]] = []

    def update(self, output: Tensor, batch: Mapping[str, Tensor]) -> None:
        """Add one batch: the model output for the task and the batch it came from."""
        output = output.detach().cpu()
        self.num_samples += int(output.shape[0])
        kind = self.spec.kind

        if kind == "classification":
            self._scores.append(class_probabilities(output))
            self._labels.append(batch_value(batch, "class", self.spec).reshape(-1).cpu())
        elif kind == "prognosis":
            self._scores.append(risk_score(self.spec, output))
            self._times.append(batch_value(batch, "time", self.spec).reshape(-1).cpu().float())
            self._events.append(batch_value(batch, "event", self.spec).reshape(-1).cpu().float())
        else:
            predicted = segmentation_labels(output)  # (B, D, H, W)
            target = batch_value(batch, "label", self.spec).cpu()
            target = target.reshape(predicted.shape)  # (B, 1, D, H, W) -> (B, D, H, W)
            for case in range(predicted.shape[0]):
                self._dice_cases.append(
                    dice_per_class(predicted[case], target[case], self.spec.num_classes)
                )

    def compute(self) -> dict[str, MetricValue]:
        """Return the task kind's metrics over everything added so far."""
        kind = self.spec.kind
        if self.num_samples == 0:
            reason = "no samples evaluated"
            names = {
                "classification": ["auc", "accuracy"],
                "prognosis": ["c_index"],
                "segmentation": ["dice"],
            }[kind]
            return {name: MetricValue.undefined(reason) for name in names}

        if kind == "classification":
            probabilities = torch.cat(self._scores)
            labels = torch.cat(self._labels)
            return {
                "auc": multiclass_auc(probabilities, labels),
                "accuracy": accuracy(probabilities.argmax(dim=1), labels),
            }

        if kind == "prognosis":
            return {
                "c_index": concordance_index(
                    torch.cat(self._scores), torch.cat(self._times), torch.cat(self._events)
                )
            }

        metrics: dict[str, MetricValue] = {}
        for cls in range(1, self.spec.num_classes):
            case_scores = [case[cls] for case in self._dice_cases if cls in case]
            metrics[f"dice_class_{cls}"] = (
                MetricValue(sum(case_scores) / len(case_scores))
                if case_scores
                else MetricValue.undefined(
                    f"class {cls} absent from every prediction and truth"
                )
            )
        metrics["dice"] = mean_defined(metrics.values(), "per-class Dice values")
        return metrics


def _pad_to_multiple(images: Tensor, divisor: int) -> tuple[Tensor, tuple[int, ...]]:
    """Zero-pad the spatial sides of ``(B, C, D, H, W)`` up to multiples of ``divisor``."""
    sides = tuple(int(side) for side in images.shape[2:])
    padding: list[int] = []
    for side in reversed(sides):  # F.pad lists the last axis first
        padding.extend([0, (-side) % divisor])
    return F.pad(images, padding), sides


@torch.no_grad()
def evaluate_task(
    model: UniconModel,
    spec: TaskSpec,
    loader: Iterable[Mapping[str, Tensor]],
    roi_size: Sequence[int] | None = None,
    sw_batch_size: int = 1,
    overlap: float = 0.25,
) -> dict[str, MetricValue]:
    """Evaluate one task of a model on every batch of a loader.

    Parameters
    ----------
    model : UniconModel
        The model; it is put in eval mode and its previous mode is restored afterwards.
    spec : TaskSpec
        The task, already grown in ``model``.
    loader : iterable of batches
        Batches with ``image`` ``(B, C, D, H, W)`` and the task kind's target keys.
    roi_size : sequence of 3 int, optional
        Segmentation only: window of ``monai.inferers.sliding_window_inference`` on whole
        volumes; each side must be divisible by ``2**(len(blocks_down) - 1)``. Without it,
        each volume goes through the model at once, zero-padded to such sides and cropped
        back.
    sw_batch_size : int, default 1
        Windows per forward pass.
    overlap : float, default 0.25
        Fraction of overlap between neighbouring windows.
    """
    divisor = model.config.size_divisor
    segmentation = spec.kind == "segmentation"
    if segmentation and roi_size is not None and any(side % divisor for side in roi_size):
        raise ModelInputError(
            f"evaluate_task: roi_size {tuple(roi_size)} for task {spec.name!r} must have sides "
            f"divisible by {divisor}."
        )

    def predict(images: Tensor) -> Tensor:
        return model(images, task=spec.name)

    evaluator = TaskEvaluator(spec)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            images = batch_value(batch, "image", spec).to(device)
            if segmentation and roi_size is not None:
                output = sliding_window_inference(
                    images, tuple(roi_size), sw_batch_size, predict, overlap=overlap
                )
            elif segmentation:
                padded, sides = _pad_to_multiple(images, divisor)
                output = predict(padded)[..., : sides[0], : sides[1], : sides[2]]
            else:
                output = predict(images)
            evaluator.update(torch.as_tensor(output), batch)
    finally:
        model.train(was_training)

    metrics = evaluator.compute()
    logger.debug(
        "evaluate_task: task %s, %d samples, %s",
        spec.name, evaluator.num_samples,
        {name: value.value for name, value in metrics.items()},
    )
    return metrics

