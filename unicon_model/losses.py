"""Task losses and the prediction helpers that turn head outputs into scores.

Batches are dictionaries of tensors as produced by the default collate of preprocessed
cases: ``image`` ``(B, C, D, H, W)``, ``label`` int64 ``(B, 1, D, H, W)`` (segmentation),
``class`` int64 ``(B,)`` (classification), ``time`` and ``event`` float32 ``(B,)``
(prognosis; days and 1 = event observed).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import Tensor

from unicon_model.spec import TaskSpec

SEGMENTATION_FOREGROUND_WEIGHT = 5.0
"""Cross-entropy weight of a foreground voxel relative to a background voxel."""


class BatchError(KeyError):
    """A batch lacks a key the task's loss or metric needs."""

    def __str__(self) -> str:
        return str(self.args[0])


def batch_value(batch: Mapping[str, Tensor], key: str, task: TaskSpec) -> Tensor:
    """Return ``batch[key]``, or raise :class:`BatchError` naming the task and the keys found."""
    if key not in batch:
        raise BatchError(
            f"task {task.name!r} ({task.kind}) needs batch key {key!r}; the batch has "
            f"{sorted(batch)}. Check that the dataset was built for a {task.kind} task."
        )
    return batch[key]


def interval_index(times: Tensor, time_bins: tuple[float, ...]) -> Tensor:
    """Return the discrete-time interval of each time.

    With edges ``t_1 < ... < t_m`` the intervals are ``[0, t_1), [t_1, t_2), ...,
    [t_m, inf)``, numbered ``0..m``. ``times`` has shape ``(B,)``; the result is int64 ``(B,)``.
    """
    edges = torch.tensor(time_bins, dtype=times.dtype, device=times.device)
    return torch.bucketize(times, edges, right=True)


def discrete_hazard_nll(
    logits: Tensor, times: Tensor, events: Tensor, time_bins: tuple[float, ...]
) -> Tensor:
    """Mean negative log-likelihood of a discrete-time hazard model.

    The head predicts one hazard logit per interval, ``h_j = sigmoid(logits[:, j])``, the
    probability of the event in interval ``j`` given survival to its start. A patient with
    an event in interval ``k`` contributes ``-log h_k - sum_{j<k} log(1 - h_j)``. A patient
    censored in interval ``k`` contributes ``-sum_{j<k} log(1 - h_j)``: it counts as having
    survived the intervals before ``k`` and gives no information about interval ``k``.

    Parameters
    ----------
    logits : Tensor
        Hazard logits ``(B, m + 1)``.
    times, events : Tensor
        Days and event indicators (1 = event), shape ``(B,)``.
    time_bins : tuple of float
        The ``m`` interval edges in days.
    """
    index = interval_index(times.float(), time_bins)  # (B,)
    bins = torch.arange(logits.shape[1], device=logits.device)
    survived = (bins.unsqueeze(0) < index.unsqueeze(1)).to(logits.dtype)  # (B, m + 1)
    event_at = F.one_hot(index, logits.shape[1]).to(logits.dtype) * events.to(logits.dtype)[:, None]

    # -log(1 - sigmoid(l)) = softplus(l) and -log(sigmoid(l)) = softplus(-l), both stable.
    per_patient = (survived * F.softplus(logits) + event_at * F.softplus(-logits)).sum(dim=1)
    return per_patient.mean()


def cox_nll(log_risk: Tensor, times: Tensor, events: Tensor) -> Tensor:
    """Negative Cox partial log-likelihood over the batch (Breslow handling of tied times).

    ``sum_{i: event} (log_risk_i - log sum_{j: t_j >= t_i} exp(log_risk_j))``, negated and
    divided by the number of events. A batch without events returns zero (with a graph, so
    ``backward`` still works). The loss couples the patients of a batch, so it has no
    per-sample form; with DP-SGD, prefer time bins.

    Parameters
    ----------
    log_risk : Tensor
        ``(B, 1)`` or ``(B,)``.
    times, events : Tensor
        ``(B,)``.
    """
    risk = log_risk.reshape(-1)
    at_risk = times[None, :] >= times[:, None]  # row i: patients still at risk at t_i
    masked = risk[None, :].expand(len(risk), -1).masked_fill(~at_risk, float("-inf"))
    log_denominator = torch.logsumexp(masked, dim=1)
    event_mask = events.to(risk.dtype)
    num_events = event_mask.sum()
    if num_events.item() == 0:
        return risk.sum() * 0.0
    return -((risk - log_denominator) * event_mask).sum() / num_events


def task_loss(spec: TaskSpec, output: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
    """Compute the training loss of a task, averaged over the batch.

    Classification: cross-entropy on ``class``. Prognosis: :func:`discrete_hazard_nll`
    with time bins, :func:`cox_nll` without. Segmentation: :func:`segmentation_loss`,
    per-sample Dice plus foreground-weighted cross-entropy.

    Parameters
    ----------
    spec : TaskSpec
        The task that produced ``output``.
    output : Tensor
        Output of ``UniconModel.forward`` for that task.
    batch : mapping of str to Tensor
        Needs ``class``, ``time`` and ``event``, or ``label`` depending on the kind.
    """
    if spec.kind == "classification":
        target = batch_value(batch, "class", spec).reshape(-1).long().to(output.device)
        return F.cross_entropy(output, target)

    if spec.kind == "prognosis":
        times = batch_value(batch, "time", spec).reshape(-1).float().to(output.device)
        events = batch_value(batch, "event", spec).reshape(-1).float().to(output.device)
        if spec.time_bins:
            return discrete_hazard_nll(output, times, events, spec.time_bins)
        return cox_nll(output, times, events)

    label = batch_value(batch, "label", spec).long().to(output.device)
    if label.ndim == output.ndim - 1:
        label = label.unsqueeze(1)  # (B, D, H, W) -> (B, 1, D, H, W)
    return segmentation_loss(output, label)


def segmentation_loss(
    logits: Tensor, label: Tensor, foreground_weight: float = SEGMENTATION_FOREGROUND_WEIGHT
) -> Tensor:
    """Dice plus class-weighted cross-entropy, each computed per sample, averaged over the batch.

    Dice is MONAI's ``DiceLoss`` (softmax, one-hot labels, background included, one
    value per sample and class). In the cross-entropy every foreground voxel weighs
    ``foreground_weight`` times a background voxel, and each sample is normalized by
    its own weight sum, so the loss stays a mean of per-sample terms (as DP-SGD needs).
    Without the weight, lesions of a few dozen voxels in a 32^3 patch were never
    predicted: the unweighted loss settles at "all background" first and leaves it
    only after hundreds of steps.

    Parameters
    ----------
    logits : Tensor
        ``(B, K, D, H, W)``.
    label : Tensor
        Class indices ``(B, 1, D, H, W)``.
    foreground_weight : float
        Cross-entropy weight of voxels of classes ``1..K-1``.
    """
    dice = DiceLoss(to_onehot_y=True, softmax=True)(logits, label)
    target = label[:, 0]  # (B, D, H, W)
    cross_entropy = F.cross_entropy(logits, target, reduction="none")  # (B, D, H, W)
    weights = torch.where(target > 0, foreground_weight, 1.0).to(logits.dtype)
    per_sample = (cross_entropy * weights).flatten(1).sum(dim=1) / weights.flatten(1).sum(dim=1)
    return dice + per_sample.mean()


def class_probabilities(output: Tensor) -> Tensor:
    """Turn classification logits ``(B, K)`` into probabilities ``(B, K)``."""
    return torch.softmax(output.float(), dim=1)


def risk_score(spec: TaskSpec, output: Tensor) -> Tensor:
    """Turn a prognosis output into one risk score per patient, higher = earlier event.

    With time bins the score is the expected number of intervals lived before the
    event, negated: ``-sum_j S_j`` with ``S_j = prod_{i<=j} (1 - h_i)``. Without bins the
    Cox log-risk is the score. Shape ``(B,)``.
    """
    if not spec.time_bins:
        return output.float().reshape(-1)
    survival = torch.cumprod(1.0 - torch.sigmoid(output.float()), dim=1)  # (B, m + 1)
    return -survival.sum(dim=1)


def segmentation_labels(output: Tensor) -> Tensor:
    """Turn segmentation logits ``(B, K, D, H, W)`` into class labels ``(B, D, H, W)``."""
    return output.argmax(dim=1)
