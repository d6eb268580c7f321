"""SegResNet-style 3D encoder, modality stems and the convolutions adapters attach to.

The encoder reproduces the layout and parameter names of the encoder half of MONAI's
``monai.networks.nets.SegResNet`` (MONAI 1.6): ``down_layers.i.0`` is the stride-2
convolution that opens level ``i > 0`` (an ``nn.Identity`` at level 0) and
``down_layers.i.k`` for ``k >= 1`` are residual blocks with ``norm1``, ``conv1``,
``norm2``, ``conv2``. SegResNet's ``convInit`` is not part of the encoder here: it is
the CT stem, ``stems.ct``.

Two deliberate differences from MONAI's ``ResBlock`` make Opacus per-sample gradients
possible: activations are not in-place and the residual add creates a new tensor
(MONAI adds the identity in place, which Opacus's backward hooks reject).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import torch
from monai.networks.blocks.segresnet_block import get_conv_layer
from torch import Tensor, nn

from unicon_model.spec import MODALITY_CHANNELS, BackboneConfig


@dataclass(frozen=True)
class ConvSite:
    """A backbone convolution that each task may adapt.

    ``key`` is the convolution's module path with dots replaced by ``_`` (for example
    ``down_layers_1_1_conv1`` for ``backbone.down_layers.1.1.conv1``), because module
    names cannot contain dots.
    """

    key: str
    in_channels: int
    out_channels: int
    stride: int


def make_norm(config: BackboneConfig, channels: int) -> nn.Module:
    """Build the normalization layer of a residual block (no running-statistics buffers)."""
    if config.norm == "instance":
        return nn.InstanceNorm3d(channels, affine=True, track_running_stats=False)
    return nn.GroupNorm(config.num_groups, channels)


class ResBlock(nn.Module):
    """Pre-activation residual block with the parameter names of MONAI's SegResNet ``ResBlock``.

    ``norm1 -> ReLU -> conv1 -> norm2 -> ReLU -> conv2`` plus the identity. Optional
    adapters run in parallel with ``conv1`` and ``conv2`` on the same input.
    """

    def __init__(self, config: BackboneConfig, channels: int) -> None:
        super().__init__()
        self.norm1 = make_norm(config, channels)
        self.norm2 = make_norm(config, channels)
        self.act = nn.ReLU(inplace=False)
        self.conv1 = get_conv_layer(3, channels, channels, kernel_size=3)
        self.conv2 = get_conv_layer(3, channels, channels, kernel_size=3)

    def forward(
        self, x: Tensor, adapter1: nn.Module | None = None, adapter2: nn.Module | None = None
    ) -> Tensor:
        """Apply the block to ``x`` of shape ``(B, C, D, H, W)``; the shape is kept."""
        hidden = self.act(self.norm1(x))
        out = self.conv1(hidden)
        if adapter1 is not None:
            out = out + adapter1(hidden)

        hidden = self.act(self.norm2(out))
        out = self.conv2(hidden)
        if adapter2 is not None:
            out = out + adapter2(hidden)

        return out + x


class SegResEncoder(nn.Module):
    """Encoder of SegResNet: ``len(blocks_down)`` levels, halving resolution per level.

    Parameters
    ----------
    config : BackboneConfig
        Filters, blocks per level and normalization.
    """

    pooled_shift: Tensor
    pooled_scale: Tensor

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        self.down_layers = nn.ModuleList()
        for level, num_blocks in enumerate(config.blocks_down):
            channels = config.level_channels[level]
            opening: nn.Module = (
                get_conv_layer(3, channels // 2, channels, stride=2) if level > 0 else nn.Identity()
            )
            blocks = [ResBlock(config, channels) for _ in range(num_blocks)]
            self.down_layers.append(nn.Sequential(opening, *blocks))
        # Statistics of the pooled features (mean and max of every channel of every level,
        # the input of a pooled head) on the backbone's pretraining data. Pooled heads
        # standardize their input with them; shift 0 and scale 1 leave it unchanged.
        # Buffers, not parameters: they travel and are saved with the frozen backbone but
        # never train, not even when the shared weights are fine-tuned.
        pooled = 2 * sum(config.level_channels)
        self.register_buffer("pooled_shift", torch.zeros(pooled))
        self.register_buffer("pooled_scale", torch.ones(pooled))

    def conv_sites(self) -> list[ConvSite]:
        """List every convolution an adapter can attach to, in forward order."""
        sites: list[ConvSite] = []
        for level, num_blocks in enumerate(self.config.blocks_down):
            channels = self.config.level_channels[level]
            if level > 0:
                sites.append(ConvSite(f"down_layers_{level}_0", channels // 2, channels, 2))
            for block in range(1, num_blocks + 1):
                for conv in ("conv1", "conv2"):
                    sites.append(
                        ConvSite(f"down_layers_{level}_{block}_{conv}", channels, channels, 1)
                    )
        return sites

    def forward(self, x: Tensor, adapters: Mapping[str, nn.Module] | None = None) -> list[Tensor]:
        """Encode stem features into one feature map per level.

        Parameters
        ----------
        x : Tensor
            Stem output, shape ``(B, init_filters, D, H, W)``.
        adapters : mapping of str to Module, optional
            Adapters keyed by :attr:`ConvSite.key`; each output is added to its convolution's.

        Returns
        -------
        list of Tensor
            Level ``i`` has shape ``(B, init_filters * 2**i, D / 2**i, H / 2**i, W / 2**i)``
            (sides rounded up for odd inputs).
        """
        def adapter(key: str) -> nn.Module | None:
            return adapters[key] if adapters is not None and key in adapters else None

        features: list[Tensor] = []
        for level, layer in enumerate(self.down_layers):
            for index, module in enumerate(cast(nn.Sequential, layer)):
                if index == 0:
                    if level > 0:
                        opening = adapter(f"down_layers_{level}_0")
                        out = module(x)
                        x = out + opening(x) if opening is not None else out
                    continue
                prefix = f"down_layers_{level}_{index}"
                x = module(x, adapter(f"{prefix}_conv1"), adapter(f"{prefix}_conv2"))
            features.append(x)
        return features


def make_stem(config: BackboneConfig, modality: str) -> nn.Module:
    """Build the input convolution of a modality, named like SegResNet's ``convInit``.

    Its weight, ``conv.weight``, has shape ``(init_filters, channels, 3, 3, 3)``.
    """
    return get_conv_layer(3, MODALITY_CHANNELS[modality], config.init_filters, kernel_size=3)


@torch.no_grad()
def initialize_stem_from(new_stem: nn.Module, new_modality: str, source_stem: nn.Module) -> None:
    """Initialize a new modality's stem from the CT stem.

    ``pet`` copies the CT weights. ``petct`` puts the CT weights on channel 0 and zeros on
    channel 1 (PET), so its first forward pass equals the CT stem applied to channel 0.
    """
    source = source_stem.get_parameter("conv.weight")
    target = new_stem.get_parameter("conv.weight")
    if new_modality == "petct":
        target.zero_()
        target[:, :1].copy_(source)
    else:
        target.copy_(source)
