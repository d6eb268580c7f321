"""Knowledge consolidation: penalties that keep shared parameters from forgetting earlier tasks.

Every method is a plain object with ``penalty(model, images) -> Tensor`` (a scalar added
to the task loss), chosen by name with :func:`build_consolidation`:

- ``none``: zero.
- ``ewc``: elastic weight consolidation (Kirkpatrick et al., "Overcoming catastrophic
  forgetting in neural networks", PNAS 2017), ``weight / 2 * sum_k F_k (theta_k - theta*_k)^2``
  with a diagonal Fisher ``F``.
- ``l2sp``: L2-SP (Li, Grandvalet and Davoine, "Explicit Inductive Bias for Transfer Learning
  with Convolutional Networks", ICML 2018), ``weight / 2 * sum_k (theta_k - theta*_k)^2`` on the
  shared parameters. The paper's separate weight decay on new parameters is left to the
  optimizer.
- ``lwf``: learning without forgetting (Li and Hoiem, "Learning without Forgetting", ECCV 2016),
  distillation of a frozen copy of the model's earlier-task outputs on the current images.

The model may be wrapped by Opacus's ``GradSampleModule``: parameter names are read with
its ``_module.`` prefix removed.

NOTE: under DP-SGD, Opacus replaces each parameter's ``.grad`` with the clipped and
noised sum of per-sample gradients. The gradient of a penalty that depends on the
parameters only (EWC, L2-SP) is therefore lost unless the training loop adds it after
Opacus privatizes the data gradient. LwF's penalty depends on the images and is clipped
with them.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unicon_model.log import get_logger
from unicon_model.losses import batch_value, task_loss
from unicon_model.model import UniconModel
from unicon_model.spec import TaskSpec

logger = get_logger(__name__)

CONSOLIDATION_METHODS: tuple[str, ...] = ("none", "ewc", "lwf", "l2sp")


class ConsolidationError(ValueError):
    """Invalid consolidation method, Fisher or reference parameters."""


class Consolidation(Protocol):
    """A consolidation method: a penalty added to the task loss during a stage."""

    name: str

    def penalty(self, model: nn.Module, images: Tensor) -> Tensor:
        """Return a scalar penalty for the model's current parameters and a batch of images."""
        ...


def named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Return the model's parameters by name, without Opacus's ``_module.`` prefix."""
    prefix = "_module."
    return {
        name[len(prefix):] if name.startswith(prefix) else name: parameter
        for name, parameter in model.named_parameters()
    }


def _select(parameters: Mapping[str, nn.Parameter], names: Iterable[str]) -> dict[str, Tensor]:
    selected: dict[str, Tensor] = {}
    for name in names:
        if name not in parameters:
            raise ConsolidationError(
                f"consolidation: parameter {name!r} is not in the model; the Fisher or "
                "reference must come from the same model version."
            )
        selected[name] = parameters[name]
    return selected


def snapshot(model: nn.Module, names: Iterable[str]) -> dict[str, Tensor]:
    """Return detached copies of the named parameters (a reference point for a penalty)."""
    return {
        name: parameter.detach().clone()
        for name, parameter in _select(named_parameters(model), names).items()
    }


class NoConsolidation:
    """No penalty (plain sequential fine-tuning of whatever is trainable)."""

    name = "none"

    def penalty(self, model: nn.Module, images: Tensor) -> Tensor:
        """Return a zero scalar on the images' device."""
        return torch.zeros((), device=images.device)


class EWC:
    """Elastic weight consolidation with a diagonal Fisher.

    Parameters
    ----------
    fisher : mapping of str to Tensor
        Diagonal Fisher per parameter name (see :func:`diagonal_fisher`).
    reference : mapping of str to Tensor
        Parameter values ``theta*`` at the end of the earlier stages, same names and shapes.
    weight : float
        Multiplier ``lambda`` of the penalty ``lambda / 2 * sum F (theta - theta*)^2``.
    """

    name = "ewc"

    def __init__(
        self, fisher: Mapping[str, Tensor], reference: Mapping[str, Tensor], weight: float
    ) -> None:
        missing = sorted(set(fisher) - set(reference))
        if missing:
            raise ConsolidationError(
                f"EWC: reference values missing for Fisher entries {missing[:5]}; snapshot the "
                "same parameter names the Fisher covers."
            )
        for name, values in fisher.items():
            if tuple(values.shape) != tuple(reference[name].shape):
                raise ConsolidationError(
                    f"EWC: Fisher {name!r} has shape {tuple(values.shape)} but the reference has "
                    f"{tuple(reference[name].shape)}."
                )
        self.fisher = {name: values.detach().float() for name, values in fisher.items()}
        self.reference = {name: reference[name].detach().float() for name in fisher}
        self.weight = float(weight)

    def penalty(self, model: nn.Module, images: Tensor) -> Tensor:
        """Return ``weight / 2 * sum F (theta - theta*)^2``; ``images`` is not used."""
        parameters = _select(named_parameters(model), self.fisher)
        total = torch.zeros((), device=images.device)
        for name, parameter in parameters.items():
            difference = parameter - self.reference[name].to(parameter.device)
            total = total + (self.fisher[name].to(parameter.device) * difference.pow(2)).sum()
        return 0.5 * self.weight * total


class L2SP:
    """Squared distance of parameters to their starting point.

    Parameters
    ----------
    reference : mapping of str to Tensor
        Starting values ``theta*`` of the penalized parameters.
    weight : float
        Multiplier ``alpha`` of ``alpha / 2 * sum (theta - theta*)^2``.
    """

    name = "l2sp"

    def __init__(self, reference: Mapping[str, Tensor], weight: float) -> None:
        self.reference = {name: values.detach().float() for name, values in reference.items()}
        self.weight = float(weight)

    def penalty(self, model: nn.Module, images: Tensor) -> Tensor:
        """Return ``weight / 2 * sum (theta - theta*)^2``; ``images`` is not used."""
        parameters = _select(named_parameters(model), self.reference)
        total = torch.zeros((), device=images.device)
        for name, parameter in parameters.items():
            total = total + (parameter - self.reference[name].to(parameter.device)).pow(2).sum()
        return 0.5 * self.weight * total


def can_derive_modality(source: str, target: str) -> bool:
    """Return whether images of modality ``source`` contain the input of modality ``target``."""
    return source == target or (source == "petct" and target in ("ct", "pet"))


def images_for_modality(images: Tensor, source: str, target: str) -> Tensor | None:
    """Derive a target modality's input from images of a source modality, if possible.

    ``petct`` images ``(B, 2, D, H, W)`` give ``ct`` (channel 0) and ``pet`` (channel 1).
    Returns None when the target cannot be derived (for example ``petct`` from ``ct``).
    """
    if not can_derive_modality(source, target):
        return None
    if source == target:
        return images
    channel = 0 if target == "ct" else 1
    return images[:, channel : channel + 1]


def _softmax_distillation(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """KL(teacher || student) of class distributions along dim 1, times ``T^2``."""
    divergence = F.kl_div(
        F.log_softmax(student / temperature, dim=1),
        F.log_softmax(teacher / temperature, dim=1),
        log_target=True,
        reduction="none",
    ).sum(dim=1)  # (B,) or (B, D, H, W)
    return divergence.mean() * temperature**2


def _bernoulli_distillation(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """KL between per-output Bernoulli distributions (hazards), summed, times ``T^2``."""
    s_scaled, t_scaled = student / temperature, teacher / temperature
    p = torch.sigmoid(t_scaled)
    divergence = p * (F.logsigmoid(t_scaled) - F.logsigmoid(s_scaled)) + (1 - p) * (
        F.logsigmoid(-t_scaled) - F.logsigmoid(-s_scaled)
    )
    return divergence.sum(dim=1).mean() * temperature**2


class LwF:
    """Learning without forgetting: match a frozen teacher's outputs on earlier tasks.

    For each earlier task whose input can be derived from the current images (see
    :func:`images_for_modality`), the student's output is pulled towards the teacher's:
    softened softmax KL for classification and segmentation, Bernoulli KL per hazard for
    prognosis. The penalty is ``weight`` times the mean over those tasks.

    Parameters
    ----------
    teacher : UniconModel
        A copy of the model from before the stage; it is frozen and set to eval mode.
    old_tasks : sequence of str
        Earlier tasks to preserve.
    temperature : float, default 2.0
        Softening temperature ``T``; the KL is multiplied by ``T^2``.
    weight : float, default 1.0
        Multiplier of the penalty.
    modality : str, optional
        Modality of the images passed to :meth:`penalty`. Without it, only old tasks whose
        modality expects as many channels as the images are used.
    """

    name = "lwf"

    def __init__(
        self,
        teacher: UniconModel,
        old_tasks: Sequence[str],
        temperature: float = 2.0,
        weight: float = 1.0,
        modality: str | None = None,
    ) -> None:
        if temperature <= 0:
            raise ConsolidationError(
                f"LwF: invalid temperature {temperature}; it must be greater than 0."
            )
        self.teacher = teacher
        self.teacher.eval()
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.tasks: list[TaskSpec] = [teacher.task_spec(task) for task in old_tasks]
        self.temperature = float(temperature)
        self.weight = float(weight)
        self.modality = modality
        if modality is not None:
            skipped = [
                task.name for task in self.tasks
                if not can_derive_modality(modality, task.modality)
            ]
            if skipped:
                logger.warning(
                    "LwF: tasks %s are not distilled because their modality cannot be derived "
                    "from %s images", skipped, modality,
                )

    def _inputs(self, images: Tensor, task: TaskSpec) -> Tensor | None:
        if self.modality is not None:
            return images_for_modality(images, self.modality, task.modality)
        return images if images.shape[1] == task.in_channels else None

    def penalty(self, model: nn.Module, images: Tensor) -> Tensor:
        """Return ``weight`` times the mean distillation loss over the usable old tasks."""
        losses: list[Tensor] = []
        for task in self.tasks:
            inputs = self._inputs(images, task)
            if inputs is None:
                continue
            with torch.no_grad():
                target = self.teacher(inputs, task=task.name)
            output = model(inputs, task=task.name)
            if task.kind == "prognosis":
                losses.append(_bernoulli_distillation(output, target, self.temperature))
            else:
                losses.append(_softmax_distillation(output, target, self.temperature))
        if not losses:
            return torch.zeros((), device=images.device)
        return self.weight * torch.stack(losses).mean()


def diagonal_fisher(
    model: UniconModel,
    task: str,
    batches: Iterable[Mapping[str, Tensor]],
    names: Sequence[str],
) -> dict[str, Tensor]:
    """Estimate the diagonal empirical Fisher of a task's loss for the named parameters.

    ``F_k = mean over batches of (d L_batch / d theta_k)^2``, where ``L_batch`` is the task
    loss (:func:`~unicon_model.losses.task_loss`) averaged over one batch. Squaring
    batch-mean gradients instead of per-sample ones is cheaper. When per-sample gradients
    are uncorrelated, it scales the estimate down by about the batch size, so sites that
    merge Fishers should use the same batch size. The EWC weight absorbs the scale.

    Parameters
    ----------
    model : UniconModel
        The model after training ``task`` (not wrapped by Opacus).
    task : str
        The task whose loss defines the Fisher.
    batches : iterable of batches
        Batches with ``image`` and the task's target keys.
    names : sequence of str
        Parameters to estimate, usually the shared ones
        (``model.trainable_sets(task, finetune_shared=True).shared``).

    Returns
    -------
    dict of str to Tensor
        Float32 tensors on the CPU, shaped like the parameters.
    """
    spec = model.task_spec(task)
    parameters = _select(named_parameters(model), names)
    previous = {name: parameter.requires_grad for name, parameter in parameters.items()}
    sums = {name: torch.zeros_like(parameter, dtype=torch.float32, device="cpu")
            for name, parameter in parameters.items()}
    device = next(model.parameters()).device
    num_batches = 0
    try:
        for parameter in parameters.values():
            parameter.requires_grad_(True)
        for batch in batches:
            output = model(batch_value(batch, "image", spec).to(device), task=task)
            loss = task_loss(spec, output, batch)
            gradients = torch.autograd.grad(loss, list(parameters.values()), allow_unused=True)
            for name, gradient in zip(parameters, gradients, strict=True):
                if gradient is not None:
                    sums[name] += gradient.detach().float().cpu().pow(2)
            num_batches += 1
    finally:
        for name, parameter in parameters.items():
            parameter.requires_grad_(previous[name])

    if num_batches == 0:
        raise ConsolidationError(
            f"diagonal_fisher: no batches for task {task!r}; the Fisher needs at least one."
        )
    logger.info("diagonal_fisher: task %s, %d batches, %d tensors", task, num_batches, len(sums))
    return {name: total / num_batches for name, total in sums.items()}


def merge_fishers(fishers: Sequence[tuple[Mapping[str, Tensor], int]]) -> dict[str, Tensor]:
    """Average Fishers from several sites, weighted by their numbers of samples.

    ``F = sum_s n_s F_s / sum_s n_s``. Every Fisher must cover the same names and shapes.
    """
    if not fishers:
        raise ConsolidationError("merge_fishers: no Fishers to merge.")
    names = set(fishers[0][0])
    total_samples = 0
    for index, (fisher, num_samples) in enumerate(fishers):
        if set(fisher) != names:
            difference = sorted(names.symmetric_difference(fisher))
            raise ConsolidationError(
                f"merge_fishers: Fisher {index} covers different parameters ({difference[:5]})."
            )
        if num_samples < 0:
            raise ConsolidationError(
                f"merge_fishers: Fisher {index} has a negative sample count {num_samples}."
            )
        total_samples += num_samples
    if total_samples == 0:
        raise ConsolidationError("merge_fishers: the sample counts sum to zero.")

    merged: dict[str, Tensor] = {}
    for name in fishers[0][0]:
        shape = tuple(fishers[0][0][name].shape)
        total = torch.zeros(shape, dtype=torch.float64)
        for index, (fisher, num_samples) in enumerate(fishers):
            if tuple(fisher[name].shape) != shape:
                raise ConsolidationError(
                    f"merge_fishers: Fisher {index} entry {name!r} has shape "
                    f"{tuple(fisher[name].shape)}, expected {shape}."
                )
            total += fisher[name].detach().double().cpu() * num_samples
        merged[name] = (total / total_samples).float()
    return merged


def build_consolidation(
    name: str,
    model: UniconModel,
    task: str,
    *,
    weight: float = 1.0,
    fisher: Mapping[str, Tensor] | None = None,
    names: Sequence[str] | None = None,
    temperature: float = 2.0,
) -> Consolidation:
    """Build a consolidation method for training ``task``, at the start of its stage.

    The reference point of EWC and L2-SP is the model's current parameter values, and the
    LwF teacher is a copy of the current model, so call this before training the stage.

    Parameters
    ----------
    name : {"none", "ewc", "lwf", "l2sp"}
    model : UniconModel
        The model about to be trained (not wrapped by Opacus).
    task : str
        The task of the stage (already grown).
    weight : float, default 1.0
        Multiplier of the penalty.
    fisher : mapping of str to Tensor, optional
        Required for ``ewc``: the (merged) diagonal Fisher of the earlier tasks.
    names : sequence of str, optional
        ``l2sp`` only: parameters to penalize; defaults to the task's shared parameters.
    temperature : float, default 2.0
        ``lwf`` only: distillation temperature.
    """
    if name not in CONSOLIDATION_METHODS:
        matches = difflib.get_close_matches(name, CONSOLIDATION_METHODS, n=1)
        hint = f" Did you mean '{matches[0]}'?" if matches else ""
        raise ConsolidationError(
            f"unknown consolidation method {name!r}; allowed values are "
            f"{', '.join(CONSOLIDATION_METHODS)}.{hint}"
        )
    spec = model.task_spec(task)

    if name == "none":
        return NoConsolidation()

    if name == "ewc":
        if fisher is None:
            raise ConsolidationError(
                "consolidation 'ewc' needs a Fisher; compute it with diagonal_fisher() after "
                "the earlier stages, or choose 'l2sp' for the first stage."
            )
        return EWC(fisher, snapshot(model, fisher), weight)

    if name == "l2sp":
        penalized = list(names) if names is not None else (
            model.trainable_sets(task, finetune_shared=True).shared
        )
        return L2SP(snapshot(model, penalized), weight)

    order = model.task_names
    old_tasks = list(order[: order.index(task)])
    if not old_tasks:
        logger.info("build_consolidation: LwF for %s has no earlier tasks to preserve", task)
    return LwF(copy.deepcopy(model), old_tasks, temperature, weight, modality=spec.modality)
