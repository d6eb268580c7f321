"""The growing foundation model: one frozen encoder, and stems, adapters and heads added per task.

Parameter names follow roles, and the server, clients and registry rely on the prefixes:

- ``backbone.`` the shared SegResNet encoder (pretrained, frozen unless a stage fine-tunes it);
- ``stems.<modality>.`` the input convolution of each modality (``stems.ct`` is SegResNet's
  ``convInit`` and exists from the start);
- ``adapters.<task>.`` the task's low-rank adapters;
- ``heads.<task>.`` the task's head (with its decoder for segmentation).

A task's forward pass uses only the backbone, its modality's stem, its own adapters and its
own head. Growing a task and training its own modules therefore leaves every earlier task's
outputs unchanged bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from unicon_model.adapters import build_task_adapters
from unicon_model.backbone import SegResEncoder, initialize_stem_from, make_stem
from unicon_model.heads import PooledHead, build_head
from unicon_model.log import get_logger
from unicon_model.spec import BackboneConfig, ModelSpec, ModelSpecError, TaskSpec

logger = get_logger(__name__)

# The CT stem is SegResNet's pretrained ``convInit``; other stems are introduced by tasks.
BASE_MODALITY = "ct"


class ModelInputError(ValueError):
    """An input tensor or a task name that the model cannot process."""


@dataclass(frozen=True)
class TrainableSets:
    """Partition of a model's parameter names for training one task.

    Attributes
    ----------
    new : list of str
        The task's own adapters and head, plus a stem this task introduced. Always trained.
    shared : list of str
        Parameters the task's forward pass uses but does not own (the backbone and the
        modality stem when another task or the pretrained model owns it). Listed only when
        shared fine-tuning is on; otherwise these names are in ``frozen``.
    frozen : list of str
        Every other parameter.
    """

    new: list[str]
    shared: list[str]
    frozen: list[str]

    @property
    def trainable(self) -> list[str]:
        """Names that receive gradients: ``new`` followed by ``shared``."""
        return [*self.new, *self.shared]


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Seed torch's CPU generator inside the block and restore it afterwards."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class UniconModel(nn.Module):
    """Foundation model that grows by task: shared encoder, per-modality stems, per-task modules.

    Parameters
    ----------
    backbone : BackboneConfig
        Encoder layout; see :meth:`BackboneConfig.preset`.
    seed : int, optional
        Seed for the initial encoder and CT stem weights (the global generator is untouched).
    """

    def __init__(self, backbone: BackboneConfig, seed: int | None = None) -> None:
        super().__init__()
        self.config = backbone
        with _seeded(seed):
            self.backbone = SegResEncoder(backbone)
            self.stems = nn.ModuleDict({BASE_MODALITY: make_stem(backbone, BASE_MODALITY)})
        self.adapters = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        self._tasks: dict[str, TaskSpec] = {}
        self._stem_owner: dict[str, str | None] = {BASE_MODALITY: None}

    # Tasks and specs

    @property
    def spec(self) -> ModelSpec:
        """Backbone configuration and tasks in the order they were grown."""
        return ModelSpec(backbone=self.config, tasks=tuple(self._tasks.values()))

    @property
    def task_names(self) -> tuple[str, ...]:
        """Names of the grown tasks in order."""
        return tuple(self._tasks)

    def task_spec(self, task: str) -> TaskSpec:
        """Return the spec of a grown task."""
        if task not in self._tasks:
            raise ModelInputError(
                f"unknown task {task!r}; the model has tasks {list(self._tasks)}. "
                "Grow the task first with UniconModel.grow()."
            )
        return self._tasks[task]

    def grow(self, spec: TaskSpec, seed: int | None = None) -> list[str]:
        """Add the modules of a new task and return the names of the new parameters.

        Adds the task's adapters and head and, when the modality is new, its stem
        (initialized from the CT stem, see :func:`initialize_stem_from`). A task with
        ``depends_on`` copies its parent's adapters, and its parent's head when both tasks
        have the same kind (parameters whose shapes differ, such as a final layer with
        another number of classes, keep their fresh initialization).

        Parameters
        ----------
        spec : TaskSpec
            The new task; its name must be new and its parent, if any, already grown.
        seed : int, optional
            Seed for the new modules' random initialization.
        """
        if spec.name in self._tasks:
            raise ModelSpecError(
                f"grow: task {spec.name!r} already exists; choose a new task name."
            )
        ModelSpec(self.config, (*self._tasks.values(), spec))  # validates depends_on order

        with _seeded(seed):
            if spec.modality not in self.stems:
                stem = make_stem(self.config, spec.modality)
                initialize_stem_from(stem, spec.modality, self.stems[BASE_MODALITY])
                self.stems[spec.modality] = stem
                self._stem_owner[spec.modality] = spec.name
            adapters = build_task_adapters(self.backbone.conv_sites(), self.config.adapter_rank)
            head = build_head(spec, self.config)

        if spec.depends_on is not None:
            self._copy_from_parent(spec, adapters, head)

        self.adapters[spec.name] = adapters
        self.heads[spec.name] = head
        self._tasks[spec.name] = spec

        new_names = self._names_under(self.owned_by(spec.name))
        logger.info(
            "grow: added task %s (%s, %s) with %d parameters in %d tensors",
            spec.name, spec.kind, spec.modality,
            sum(self.get_parameter(name).numel() for name in new_names), len(new_names),
        )
        return new_names

    @torch.no_grad()
    def _copy_from_parent(self, spec: TaskSpec, adapters: nn.Module, head: nn.Module) -> None:
        parent = self._tasks[str(spec.depends_on)]
        adapters.load_state_dict(self.adapters[parent.name].state_dict())
        if parent.kind != spec.kind:
            logger.info(
                "grow: task %s copies only the adapters of %s (kinds %s and %s differ)",
                spec.name, parent.name, spec.kind, parent.kind,
            )
            return

        parent_state = self.heads[parent.name].state_dict()
        own_state = head.state_dict()
        matching = {
            name: value for name, value in parent_state.items()
            if name in own_state and own_state[name].shape == value.shape
        }
        head.load_state_dict(matching, strict=False)
        skipped = sorted(set(own_state) - set(matching))
        logger.info(
            "grow: task %s starts from the adapters and head of %s%s",
            spec.name, parent.name,
            f" (kept fresh, shapes differ: {', '.join(skipped)})" if skipped else "",
        )

    # Forward

    def forward(self, x: Tensor, task: str) -> Tensor:
        """Run one task on a batch of images.

        Parameters
        ----------
        x : Tensor
            Images ``(B, C, D, H, W)`` with ``C`` the channels of the task's modality
            (``petct``: channel 0 CT, channel 1 PET).
        task : str
            Name of a grown task.

        Returns
        -------
        Tensor
            Classification: logits ``(B, K)``. Prognosis: hazard logits ``(B, n_bins)``
            with ``n_bins = len(time_bins) + 1``, or a Cox log-risk ``(B, 1)`` without
            time bins. Segmentation: logits ``(B, K, D, H, W)``; each of ``D, H, W`` must be
            divisible by ``2**(len(blocks_down) - 1)``.
        """
        spec = self.task_spec(task)
        self._check_input(x, spec)
        features = self.backbone(self.stems[spec.modality](x), self.adapters[task])
        head = self.heads[task]
        if isinstance(head, PooledHead):
            return head(features, self.backbone.pooled_shift, self.backbone.pooled_scale)
        return head(features)

    def _check_input(self, x: Tensor, spec: TaskSpec) -> None:
        if x.ndim != 5 or x.shape[1] != spec.in_channels:
            raise ModelInputError(
                f"task {spec.name!r} ({spec.modality}) expects images of shape "
                f"(B, {spec.in_channels}, D, H, W); got {tuple(x.shape)}."
            )
        divisor = self.config.size_divisor
        if spec.kind == "segmentation" and any(side % divisor for side in x.shape[2:]):
            raise ModelInputError(
                f"task {spec.name!r} (segmentation) needs spatial sides divisible by {divisor}; "
                f"got {tuple(x.shape[2:])}. Pad or crop the volume, or use sliding-window "
                "inference with such a window."
            )

    # Parameter sets

    def owned_by(self, task: str) -> list[str]:
        """Return the names of the modules a task owns: its adapters, head and introduced stem."""
        self.task_spec(task)
        owned = [
            f"stems.{modality}" for modality, owner in self._stem_owner.items() if owner == task
        ]
        return [*owned, f"adapters.{task}", f"heads.{task}"]

    def _names_under(self, prefixes: Iterable[str]) -> list[str]:
        dotted = tuple(f"{prefix}." for prefix in prefixes)
        return [name for name, _ in self.named_parameters() if name.startswith(dotted)]

    def trainable_sets(self, task: str, finetune_shared: bool = False) -> TrainableSets:
        """Split parameter names into new, shared and frozen for training ``task``.

        See :class:`TrainableSets`. Names keep :meth:`named_parameters` order.
        """
        spec = self.task_spec(task)
        new = self._names_under(self.owned_by(task))
        shared: list[str] = []
        if finetune_shared:
            used = ["backbone", f"stems.{spec.modality}"]
            shared = [name for name in self._names_under(used) if name not in new]
        assigned = {*new, *shared}
        frozen = [name for name, _ in self.named_parameters() if name not in assigned]
        return TrainableSets(new=new, shared=shared, frozen=frozen)

    def set_trainable(self, names: Iterable[str]) -> None:
        """Set ``requires_grad`` to True for exactly ``names`` and False for all others."""
        requested = set(names)
        parameters = dict(self.named_parameters())
        unknown = sorted(requested - set(parameters))
        if unknown:
            raise ModelInputError(
                f"set_trainable: unknown parameter names {unknown[:5]}"
                f"{' ...' if len(unknown) > 5 else ''}; names must come from named_parameters()."
            )
        for name, parameter in parameters.items():
            parameter.requires_grad_(name in requested)

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Return the shape of every parameter by name (for checking tensors received)."""
        return {name: tuple(parameter.shape) for name, parameter in self.named_parameters()}
