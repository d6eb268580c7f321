"""Loading pretrained SegResNet encoder weights from a local safetensors file.

Two layouts of MONAI 1.6 are recognized, optionally under one wrapper prefix such as
``encoder.`` or ``model.``:

``monai.networks.nets.SegResNet`` (same names as this package's encoder)
    ``convInit.conv.weight``  ->  ``stems.ct.conv.weight``
    ``down_layers.<rest>``    ->  ``backbone.down_layers.<rest>``
    ``up_layers.*``, ``up_samples.*``, ``conv_final.*`` (decoder)  ->  ignored

``monai.networks.nets.segresnet_ds.SegResEncoder`` (the layout CT-FM publishes)
    ``conv_init.weight``  ->  ``stems.ct.conv.weight``
    ``layers.i.blocks.k.normN.{weight,bias}``  ->  ``backbone.down_layers.i.(k+1).normN.*``
    ``layers.i.blocks.k.convN.weight``  ->  ``backbone.down_layers.i.(k+1).convN.conv.weight``
    ``layers.i.downsample.weight``  ->  ``backbone.down_layers.(i+1).0.conv.weight``
    (``N`` is 1 or 2.)

Both layouts may also contain ``unicon.pooled_shift`` and ``unicon.pooled_scale``, the
pooled-feature statistics that :mod:`simulation.pretrain` measures on its cohort. They
are loaded into the backbone's buffers of the same names. Without them pooled heads see
their input unchanged (shift 0, scale 1).

SegResEncoder downsamples at the end of level ``i`` and SegResNet at the start of level
``i + 1``; both compute the same function. Running statistics of BatchNorm or
InstanceNorm layers (``running_mean``, ``running_var``, ``num_batches_tracked``) are
dropped with a warning, because this encoder's GroupNorm or InstanceNorm layers keep none.

NOTE: a checkpoint trained with BatchNorm loads by name and shape, but its
normalization then computes group or instance statistics instead of the stored running
statistics, so features differ from the original network until adapters compensate.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from unicon_model.log import get_logger
from unicon_model.model import BASE_MODALITY, UniconModel
from unicon_model.serialization import ModelFileError, load_tensors

logger = get_logger(__name__)

_WRAPPER_PREFIXES = ("", "encoder.", "model.", "module.", "net.", "network.", "backbone.")
_DECODER_PREFIXES = ("up_layers.", "up_samples.", "conv_final.")
_RUNNING_STATISTICS = (".running_mean", ".running_var", ".num_batches_tracked")
_STEM_KEY = f"stems.{BASE_MODALITY}.conv.weight"
POOLED_STATISTICS = {"unicon.pooled_shift": "pooled_shift", "unicon.pooled_scale": "pooled_scale"}
"""Checkpoint key -> backbone buffer of the optional pooled-feature statistics."""

_ENCODER_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.(norm[12]|conv[12])\.(weight|bias)$")
_ENCODER_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.weight$")


class BackboneCheckpointError(ValueError):
    """A pretrained checkpoint that does not fit the model's backbone."""


def _map_segresnet(key: str) -> str | None:
    if key == "convInit.conv.weight":
        return _STEM_KEY
    if key.startswith("down_layers."):
        return f"backbone.{key}"
    return None


def _map_segres_encoder(key: str) -> str | None:
    if key == "conv_init.weight":
        return _STEM_KEY
    block = _ENCODER_BLOCK.match(key)
    if block:
        level, index, layer, kind = block.groups()
        suffix = f"{layer}.{kind}" if layer.startswith("norm") else f"{layer}.conv.{kind}"
        return f"backbone.down_layers.{level}.{int(index) + 1}.{suffix}"
    downsample = _ENCODER_DOWNSAMPLE.match(key)
    if downsample:
        return f"backbone.down_layers.{int(downsample.group(1)) + 1}.0.conv.weight"
    return None


def _detect_layout(keys: list[str]) -> tuple[str, str]:
    """Return ``(prefix, layout)`` for the first wrapper prefix under which a layout is found."""
    for prefix in _WRAPPER_PREFIXES:
        if f"{prefix}convInit.conv.weight" in keys:
            return prefix, "SegResNet"
        if f"{prefix}conv_init.weight" in keys:
            return prefix, "SegResEncoder"
    raise BackboneCheckpointError(
        "checkpoint layout not recognized: expected 'convInit.conv.weight' (MONAI SegResNet) or "
        "'conv_init.weight' (MONAI SegResEncoder), optionally under one of the prefixes "
        f"{[prefix for prefix in _WRAPPER_PREFIXES if prefix]}; found keys {keys[:8]}."
    )


def map_checkpoint_keys(
    state: dict[str, Tensor],
) -> tuple[dict[str, str], list[str], list[str]]:
    """Map checkpoint keys to model parameter names.

    Returns
    -------
    mapped : dict of str to str
        Model name (``backbone.*`` or ``stems.ct.conv.weight``) to checkpoint key.
    unexpected : list of str
        Checkpoint keys that map to nothing.
    ignored : list of str
        Decoder tensors and normalization running statistics, deliberately not loaded.
    """
    keys = sorted(state)
    prefix, layout = _detect_layout(keys)
    mapper = _map_segresnet if layout == "SegResNet" else _map_segres_encoder

    mapped: dict[str, str] = {}
    unexpected: list[str] = []
    ignored: list[str] = []
    for key in keys:
        local = key[len(prefix):] if key.startswith(prefix) else key
        if local.endswith(_RUNNING_STATISTICS) or local.startswith(_DECODER_PREFIXES):
            ignored.append(key)
            continue
        target = mapper(local) if key.startswith(prefix) else None
        if target is None:
            unexpected.append(key)
        else:
            mapped[target] = key
    logger.info(
        "load_backbone_checkpoint: %s layout under prefix %r, %d tensors mapped, %d ignored",
        layout, prefix, len(mapped), len(ignored),
    )
    return mapped, unexpected, ignored


def load_backbone_checkpoint(model: UniconModel, path: Path) -> list[str]:
    """Load pretrained encoder weights from a local safetensors file into the backbone and CT stem.

    Nothing is downloaded: ``path`` must be a local file. Load before growing tasks, because
    stems of other modalities are initialized from the CT stem when they are grown.

    Parameters
    ----------
    model : UniconModel
        The model whose ``backbone.*`` and ``stems.ct.*`` parameters are replaced.
    path : Path
        A safetensors file in one of the layouts described in this module.

    Returns
    -------
    list of str
        The model parameter names that were loaded.

    Raises
    ------
    BackboneCheckpointError
        When the file is not safetensors, its layout is unknown, or keys are missing,
        unexpected or of another shape; the message lists each kind.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise BackboneCheckpointError(
            f"{path}: only .safetensors checkpoints are read (pickle-based .pt/.ckpt files are "
            "not loaded); convert it once with safetensors.torch.save_file(state_dict, ...)."
        )
    try:
        state = load_tensors(path)
    except ModelFileError as error:
        raise BackboneCheckpointError(str(error)) from error

    statistics = {key: state.pop(key) for key in POOLED_STATISTICS if key in state}
    try:
        mapped, unexpected, ignored = map_checkpoint_keys(state)
    except BackboneCheckpointError as error:
        raise BackboneCheckpointError(f"{path}: {error}") from None
    if ignored:
        logger.warning(
            "load_backbone_checkpoint: %s: %d decoder or running-statistics tensors not loaded "
            "(for example %s)", path, len(ignored), ignored[0],
        )

    parameters = dict(model.named_parameters())
    targets = [_STEM_KEY, *(name for name in parameters if name.startswith("backbone."))]
    missing = [name for name in targets if name not in mapped]
    unexpected += [key for name, key in mapped.items() if name not in parameters]
    mismatched = [
        f"{mapped[name]} -> {name}: checkpoint {tuple(state[mapped[name]].shape)}, "
        f"model {tuple(parameters[name].shape)}"
        for name in targets
        if name in mapped and state[mapped[name]].shape != parameters[name].shape
    ]
    for key, value in statistics.items():
        buffer = model.backbone.get_buffer(POOLED_STATISTICS[key])
        if value.shape != buffer.shape:
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)}, model {tuple(buffer.shape)}")
        elif not bool(torch.isfinite(value).all()) or (
            key.endswith("scale") and not bool((value > 0).all())
        ):
            mismatched.append(f"{key}: holds non-finite values or a scale <= 0")
    if missing or unexpected or mismatched:
        raise BackboneCheckpointError(
            f"{path}: checkpoint does not fit the backbone ({model.config}).\n"
            f"  missing keys, model names ({len(missing)}): {missing[:20]}\n"
            f"  unexpected keys, checkpoint names ({len(unexpected)}): {sorted(unexpected)[:20]}\n"
            f"  shape mismatches ({len(mismatched)}): {mismatched[:20]}\n"
            "Build the model with the checkpoint's init_filters and blocks_down."
        )

    with torch.no_grad():
        for name in targets:
            parameters[name].copy_(state[mapped[name]].to(parameters[name].dtype))
        for key, value in statistics.items():
            buffer = model.backbone.get_buffer(POOLED_STATISTICS[key])
            buffer.copy_(value.to(buffer.dtype))

    other_stems = [modality for modality in model.stems if modality != BASE_MODALITY]
    if other_stems:
        logger.warning(
            "load_backbone_checkpoint: stems %s were grown from the previous CT stem and keep "
            "their weights; load checkpoints before growing tasks", other_stems,
        )
    loaded = targets + [f"backbone.{POOLED_STATISTICS[key]}" for key in statistics]
    logger.info("load_backbone_checkpoint: loaded %d tensors from %s", len(loaded), path)
    return loaded
