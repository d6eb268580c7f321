"""Task heads: pooled heads for classification and prognosis, a light decoder for segmentation.

Every head takes the list of encoder feature maps (finest first) and is built only from
layers Opacus supports (Conv3d, Linear, GroupNorm or InstanceNorm, parameter-free ops).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unicon_model.backbone import make_norm
from unicon_model.spec import BackboneConfig, TaskSpec

FOREGROUND_PRIOR = 0.01
"""Initial probability of each foreground class at every voxel of a segmentation head."""


def pool_levels(features: list[Tensor]) -> Tensor:
    """Average- and max-pool the ReLU of every level ``(B, C_l, d_l, h_l, w_l)``.

    Returns ``(B, 2 * sum(C_l))``: per level, the means of its channels, then their maxima.
    """
    pooled: list[Tensor] = []
    for feature in features:
        activated = F.relu(feature).flatten(2)  # (B, C_l, d_l * h_l * w_l)
        pooled += [activated.mean(dim=2), activated.amax(dim=2)]
    return torch.cat(pooled, dim=1)


class PooledHead(nn.Module):
    """Average- and max-pool the activated features of every encoder level, then a linear layer.

    Used for classification (class logits) and prognosis (discrete hazard logits, or one
    Cox log-risk when the task has no time bins). Every level is pooled, not only the
    deepest: a finding of a few voxels, such as a small nodule, is resolved only at the
    fine levels and is averaged away by the stride of the deepest one. There is
    deliberately no normalization before pooling: GroupNorm or InstanceNorm would rescale
    each case on its own and erase differences in overall intensity and lesion size that
    the label may depend on. Max pooling keeps a small focal finding visible next to the
    average.

    Parameters
    ----------
    config : BackboneConfig
        Gives the channels ``C_l`` of every level ``l``.
    num_outputs : int
        Width ``K`` of the output.
    """

    def __init__(self, config: BackboneConfig, num_outputs: int) -> None:
        super().__init__()
        self.fc = nn.Linear(2 * sum(config.level_channels), num_outputs)

    def forward(
        self, features: list[Tensor], shift: Tensor | None = None, scale: Tensor | None = None
    ) -> Tensor:
        """Map the feature maps ``(B, C_l, d_l, h_l, w_l)``, finest first, to logits ``(B, K)``.

        ``shift`` and ``scale`` (each ``(2 * sum(C_l),)``, the backbone's pooled-feature
        statistics) standardize the pooled vector before the linear layer. Pooled
        features of a frozen encoder differ in offset and spread by orders of magnitude.
        On the demo cohort (150 training cases), a linear head trained on them raw reached
        test AUC 0.70, and 0.78 on standardized ones with the same optimizer.
        """
        vector = pool_levels(features)  # (B, 2 * sum(C_l))
        if shift is not None and scale is not None:
            vector = (vector - shift) / scale
        return self.fc(vector)  # (B, K)


class SegmentationHead(nn.Module):
    """Light top-down decoder with additive skip connections from every encoder level.

    A 1x1x1 convolution projects each level to ``init_filters`` channels. From the deepest
    level up, the running map is upsampled (trilinear) to the next finer level, added to
    that level's projection and refined by ``norm -> ReLU -> 3x3x3 conv``. A final
    ``norm -> ReLU -> 1x1x1 conv`` gives class logits at input resolution. Because every
    decoder level has ``init_filters`` channels, the head stays small even for the ``ctfm``
    encoder (142,882 parameters with 2 classes).

    Parameters
    ----------
    config : BackboneConfig
        Encoder layout.
    num_classes : int
        Classes including background.
    """

    def __init__(self, config: BackboneConfig, num_classes: int) -> None:
        super().__init__()
        width = config.init_filters
        self.lateral = nn.ModuleList(
            nn.Conv3d(channels, width, kernel_size=1) for channels in config.level_channels
        )
        self.blocks = nn.ModuleList(
            nn.Sequential(
                make_norm(config, width),
                nn.ReLU(inplace=False),
                nn.Conv3d(width, width, kernel_size=3, padding=1, bias=False),
            )
            for _ in range(config.num_levels - 1)
        )
        classifier = nn.Conv3d(width, num_classes, kernel_size=1)
        # Prior-probability initialization (Lin et al., "Focal Loss for Dense Object
        # Detection", ICCV 2017): every voxel starts as background with probability
        # about 1 - FOREGROUND_PRIOR. From an even start the head first spends many
        # steps suppressing the foreground everywhere before it finds small lesions.
        prior_logit = -math.log((1.0 - FOREGROUND_PRIOR) / FOREGROUND_PRIOR)
        bias = torch.full((num_classes,), prior_logit)
        bias[0] = 0.0
        classifier.bias = nn.Parameter(bias)
        self.final = nn.Sequential(make_norm(config, width), nn.ReLU(inplace=False), classifier)

    def forward(self, features: list[Tensor]) -> Tensor:
        """Map encoder features to logits ``(B, K, D, H, W)`` at the finest level's size."""
        out = self.lateral[-1](features[-1])
        for level in reversed(range(len(features) - 1)):
            skip = self.lateral[level](features[level])
            out = F.interpolate(out, size=skip.shape[2:], mode="trilinear", align_corners=False)
            out = self.blocks[level](out + skip)
        return self.final(out)


def build_head(task: TaskSpec, config: BackboneConfig) -> nn.Module:
    """Build the head of ``task`` for an encoder with layout ``config``."""
    if task.kind == "segmentation":
        return SegmentationHead(config, task.num_classes)
    return PooledHead(config, task.num_outputs)
