"""The UNICON model and continual-learning maths, free of any Flower dependency."""

from unicon_model.model import ModelInputError, TrainableSets, UniconModel
from unicon_model.spec import BackboneConfig, ModelSpec, ModelSpecError, TaskSpec

__all__ = [
    "BackboneConfig",
    "ModelInputError",
    "ModelSpec",
    "ModelSpecError",
    "TaskSpec",
    "TrainableSets",
    "UniconModel",
]
