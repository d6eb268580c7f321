"""Validation and round trips of BackboneConfig, TaskSpec and ModelSpec."""

from __future__ import annotations

import json

import pytest

from unicon_model.spec import BackboneConfig, ModelSpec, ModelSpecError, TaskSpec


def test_spec_round_trip_through_json() -> None:
    spec = ModelSpec(
        backbone=BackboneConfig.preset("tiny"),
        tasks=(
            TaskSpec("ct_cls", "classification", "ct", num_classes=3),
            TaskSpec("ct_prog", "prognosis", "ct", time_bins=(180, 365.0, 730)),
            TaskSpec("ct_seg", "segmentation", "ct"),
            TaskSpec("petct_seg", "segmentation", "petct", depends_on="ct_seg"),
        ),
    )

    restored = ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict())))

    assert restored == spec
    assert restored.task("ct_prog").time_bins == (180.0, 365.0, 730.0)
    assert restored.task("ct_prog").num_outputs == 4
    assert restored.task("petct_seg").in_channels == 2


def test_spec_presets_have_published_layout() -> None:
    ctfm = BackboneConfig.preset("ctfm")

    assert ctfm.init_filters == 32
    assert ctfm.blocks_down == (1, 2, 2, 4, 4)
    assert ctfm.num_groups == 8
    assert ctfm.level_channels == (32, 64, 128, 256, 512)
    assert ctfm.size_divisor == 16


def test_spec_kind_error_names_field_value_and_hint() -> None:
    with pytest.raises(ModelSpecError) as error:
        TaskSpec("ct_cls", "clasification", "ct")

    message = str(error.value)
    assert "'kind'" in message
    assert "'clasification'" in message
    assert "classification, prognosis, segmentation" in message
    assert "Did you mean 'classification'" in message


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        ({"name": "CT.cls", "kind": "classification", "modality": "ct"}, "'name'"),
        ({"name": "t", "kind": "segmentation", "modality": "mri"}, "'modality'"),
        ({"name": "t", "kind": "segmentation", "modality": "ct", "num_classes": 1}, "background"),
        ({"name": "t", "kind": "prognosis", "modality": "ct", "time_bins": (5, 3)}, "ascending"),
        ({"name": "t", "kind": "prognosis", "modality": "ct", "time_bins": (0, 3)}, "greater"),
        ({"name": "t", "kind": "classification", "modality": "ct", "time_bins": (3,)}, "only"),
        ({"name": "t", "kind": "classification", "modality": "ct", "depends_on": "t"}, "itself"),
    ],
)
def test_spec_invalid_task_rejected(arguments: dict, fragment: str) -> None:
    with pytest.raises(ModelSpecError, match=fragment):
        TaskSpec(**arguments)


def test_spec_backbone_groups_must_divide_filters() -> None:
    with pytest.raises(ModelSpecError, match="does not divide init_filters=8"):
        BackboneConfig(init_filters=8, num_groups=3)


def test_spec_unknown_preset_and_key_rejected() -> None:
    with pytest.raises(ModelSpecError, match="Did you mean 'tiny'"):
        BackboneConfig.preset("tin")
    with pytest.raises(ModelSpecError, match=r"unknown key 'adapter_rnk'.*adapter_rank"):
        BackboneConfig.from_dict({"adapter_rnk": 4})


def test_spec_dependency_must_come_first() -> None:
    with pytest.raises(ModelSpecError, match="'depends_on': 'ct_seg' is not an earlier task"):
        ModelSpec(
            BackboneConfig(),
            (
                TaskSpec("petct_seg", "segmentation", "petct", depends_on="ct_seg"),
                TaskSpec("ct_seg", "segmentation", "ct"),
            ),
        )


def test_spec_duplicate_task_rejected() -> None:
    task = TaskSpec("ct_seg", "segmentation", "ct")
    with pytest.raises(ModelSpecError, match="appears twice"):
        ModelSpec(BackboneConfig(), (task, task))


def test_spec_future_format_version_rejected() -> None:
    data = ModelSpec(BackboneConfig()).to_dict()
    data["format_version"] = 99

    with pytest.raises(ModelSpecError, match="format_version"):
        ModelSpec.from_dict(data)
