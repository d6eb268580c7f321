"""Per-task low-rank adapters on the backbone's convolutions.

Each adapted convolution ``W`` computes ``W x + U(D x)`` for its task, where ``D`` is a
1x1x1 convolution from ``in`` to ``r`` channels (with the convolution's stride) and ``U``
a 1x1x1 convolution from ``r`` to ``out`` channels. ``U`` starts at zero, so a freshly
grown task computes exactly the frozen backbone's features. This is the LoRA idea (Hu et al., "LoRA:
Low-Rank Adaptation of Large Language Models", ICLR 2022) restricted to the channel
mixing of a 3D convolution. Both paths are ``nn.Conv3d`` modules called as modules, so
Opacus computes their per-sample gradients with its standard hooks.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from unicon_model.backbone import ConvSite


class LowRankAdapter(nn.Module):
    """Low-rank residual path ``up(down(x))`` added to one convolution's output.

    Parameters
    ----------
    in_channels, out_channels : int
        Channels of the adapted convolution.
    rank : int
        Bottleneck width ``r``.
    stride : int, default 1
        Stride of the adapted convolution, so that output sizes match (for a 3x3x3
        convolution with padding 1 and stride 2, a 1x1x1 stride-2 convolution gives the
        same output size).
    """

    def __init__(self, in_channels: int, out_channels: int, rank: int, stride: int = 1) -> None:
        super().__init__()
        self.down = nn.Conv3d(in_channels, rank, kernel_size=1, stride=stride, bias=False)
        self.up = nn.Conv3d(rank, out_channels, kernel_size=1, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(B, in, D, H, W)`` to ``(B, out, D / stride, H / stride, W / stride)``."""
        return self.up(self.down(x))


def build_task_adapters(sites: Sequence[ConvSite], rank: int) -> nn.ModuleDict:
    """Build one adapter per backbone convolution, keyed by :attr:`ConvSite.key`."""
    return nn.ModuleDict(
        {
            site.key: LowRankAdapter(site.in_channels, site.out_channels, rank, site.stride)
            for site in sites
        }
    )
