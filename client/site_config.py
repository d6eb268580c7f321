"""The site YAML: which datasets a hospital serves to which curriculum tasks.

A site file looks like this (relative paths are relative to the YAML file)::

    site: hospital-a
    state_dir: state/hospital-a
    datasets:
      - task: ct_seg
        kind: segmentation          # classification | prognosis | segmentation
        modality: ct                # ct | pet | petct
        format: csv                 # csv | msd | nnunet
        manifest: data/ct_seg.csv   # csv: manifest; msd: dataset.json; nnunet: dataset folder
        label_map: {1: [2, 3]}      # optional: task class -> source label values
    privacy: {...}                  # optional, parsed by the privacy module

The file is validated once, here, into frozen dataclasses. Every error names the
file, the key, the value found, the values allowed and the fix.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from unicon_model.log import get_logger

logger = get_logger(__name__)

TASK_KINDS = ("classification", "prognosis", "segmentation")
MODALITIES = ("ct", "pet", "petct")
FORMATS = ("csv", "msd", "nnunet")

SITE_KEYS = ("site", "state_dir", "datasets", "privacy")
DATASET_KEYS = ("task", "kind", "modality", "format", "manifest", "label_map")
_REQUIRED_SITE_KEYS = ("site", "state_dir", "datasets")
_REQUIRED_DATASET_KEYS = ("task", "kind", "modality", "format", "manifest")

_SITE_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$")
_TASK_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class SiteConfigError(ValueError):
    """A site YAML file is missing, unreadable or contains an invalid value."""


@dataclass(frozen=True)
class DatasetConfig:
    """One dataset of a site and the curriculum task it serves.

    Attributes
    ----------
    task : str
        Curriculum task name, for example ``ct_seg``.
    kind : str
        ``classification``, ``prognosis`` or ``segmentation``.
    modality : str
        ``ct``, ``pet`` or ``petct`` (two channels: CT then PET).
    format : str
        ``csv`` (a manifest), ``msd`` (a Decathlon ``dataset.json``) or ``nnunet``
        (an nnU-Net v2 raw dataset folder).
    manifest : Path
        Absolute path of the manifest, the ``dataset.json`` or the dataset folder.
    label_map : dict[int, tuple[int, ...]] or None
        Task class -> source label values. Source values not listed become
        background (0). ``None`` means the label values already are the task classes.
    """

    task: str
    kind: str
    modality: str
    format: str
    manifest: Path
    label_map: dict[int, tuple[int, ...]] | None = None

    def default_num_classes(self) -> int:
        """Return the number of task classes implied by the label map (max key + 1), else 2."""
        if self.label_map:
            return max(self.label_map) + 1
        return 2


@dataclass(frozen=True)
class SiteConfig:
    """A validated site YAML file.

    Attributes
    ----------
    site : str
        Site id: lower-case letters, digits and ``-``.
    state_dir : Path
        Absolute path of the folder for caches, ledgers and logs.
    datasets : tuple[DatasetConfig, ...]
        One dataset per task; task names are unique.
    privacy : Mapping[str, Any] or None
        The ``privacy`` section as written; parsed by the privacy module.
    source : Path
        Absolute path of the YAML file this configuration was read from.
    """

    site: str
    state_dir: Path
    datasets: tuple[DatasetConfig, ...]
    privacy: Mapping[str, Any] | None
    source: Path

    @property
    def cache_dir(self) -> Path:
        """Folder of preprocessed cases (``state_dir/cache``)."""
        return self.state_dir / "cache"

    def dataset_for(self, task: str) -> DatasetConfig | None:
        """Return the dataset that serves ``task``, or None when the site has none."""
        for dataset in self.datasets:
            if dataset.task == task:
                return dataset
        return None


def find_site_files(folder: Path) -> list[Path]:
    """Return the site YAMLs of a folder: ``*.yaml`` in it and ``*/site.yaml`` one level down.

    The second form is the layout ``unicon simulate`` and ``python -m simulation.generate``
    write (one folder per site). The order is by path, so a ``partition-id`` always maps
    to the same site.
    """
    folder = Path(folder)
    return sorted([*folder.glob("*.yaml"), *folder.glob("*/site.yaml")])


def load_site_config(path: str | os.PathLike[str]) -> SiteConfig:
    """Read and validate a site YAML file.

    Parameters
    ----------
    path : str or PathLike
        The site YAML file.

    Returns
    -------
    SiteConfig
        With every relative path resolved against the YAML file's folder.

    Raises
    ------
    SiteConfigError
        When the file is missing, is not valid YAML, or a key or value is invalid.
        The message names the file, the key, the value, the allowed values and the fix.
    """
    source = Path(os.path.abspath(path))
    if not source.is_file():
        raise SiteConfigError(
            f"{source}: site file not found; pass the path of a site YAML file "
            "(see sites/README.md for an example)"
        )
    try:
        document = yaml.safe_load(source.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise SiteConfigError(
            f"{source}: invalid YAML ({error}); fix the syntax at the position shown"
        ) from error
    if not isinstance(document, Mapping):
        raise SiteConfigError(
            f"{source}: expected a mapping with keys {', '.join(_REQUIRED_SITE_KEYS)}, "
            f"found {type(document).__name__}; start from the example in sites/README.md"
        )

    _reject_unknown_keys(source, "", document, SITE_KEYS)
    for key in _REQUIRED_SITE_KEYS:
        if key not in document:
            raise SiteConfigError(f"{source}: required key '{key}' is missing; add it")

    site = _parse_site_name(source, document["site"])
    state_dir = _parse_path(source, "state_dir", document["state_dir"])
    datasets = _parse_datasets(source, document["datasets"])

    privacy = document.get("privacy")
    if privacy is not None and not isinstance(privacy, Mapping):
        raise SiteConfigError(
            f"{source}: key 'privacy' must be a mapping, found {privacy!r}; "
            "write it as 'privacy:' followed by indented keys, or remove it"
        )

    config = SiteConfig(
        site=site, state_dir=state_dir, datasets=datasets, privacy=privacy, source=source
    )
    logger.debug("loaded site config %s: site=%s, %d datasets", source, site, len(datasets))
    return config


def _closest(value: str, allowed: Sequence[str]) -> str:
    """Return ' (did you mean X?)' for the closest allowed spelling, or ''."""
    matches = difflib.get_close_matches(value, list(allowed), n=1)
    return f" (did you mean '{matches[0]}'?)" if matches else ""


def _reject_unknown_keys(
    source: Path, where: str, mapping: Mapping[Any, Any], allowed: Sequence[str]
) -> None:
    for key in mapping:
        if key not in allowed:
            raise SiteConfigError(
                f"{source}: unknown key '{where}{key}'{_closest(str(key), allowed)}; "
                f"allowed keys: {', '.join(allowed)}"
            )


def _parse_site_name(source: Path, value: Any) -> str:
    if not isinstance(value, str) or not _SITE_NAME.match(value):
        raise SiteConfigError(
            f"{source}: key 'site' is {value!r}; use lower-case letters, digits and '-', "
            "starting and ending with a letter or digit (for example 'hospital-a')"
        )
    return value


def _parse_path(source: Path, key: str, value: Any) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise SiteConfigError(
            f"{source}: key '{key}' is {value!r}; give a path (relative paths are "
            "relative to the folder of this YAML file)"
        )
    return Path(os.path.abspath(source.parent / os.path.expanduser(value)))


def _parse_choice(source: Path, key: str, value: Any, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        hint = _closest(value, allowed) if isinstance(value, str) else ""
        raise SiteConfigError(
            f"{source}: key '{key}' is {value!r}{hint}; allowed values: {', '.join(allowed)}"
        )
    return value


def _parse_datasets(source: Path, value: Any) -> tuple[DatasetConfig, ...]:
    if not isinstance(value, list) or not value:
        raise SiteConfigError(
            f"{source}: key 'datasets' is {value!r}; give a non-empty list with one entry "
            "(task, kind, modality, format, manifest) per task"
        )
    datasets: list[DatasetConfig] = []
    for index, entry in enumerate(value):
        dataset = _parse_dataset(source, index, entry)
        if any(other.task == dataset.task for other in datasets):
            raise SiteConfigError(
                f"{source}: key 'datasets[{index}].task' is '{dataset.task}', which an "
                "earlier dataset already serves; give each task one dataset (merge the "
                "manifests or rename the task)"
            )
        datasets.append(dataset)
    return tuple(datasets)


def _parse_dataset(source: Path, index: int, entry: Any) -> DatasetConfig:
    where = f"datasets[{index}]."
    if not isinstance(entry, Mapping):
        raise SiteConfigError(
            f"{source}: '{where[:-1]}' is {entry!r}; expected a mapping with keys "
            f"{', '.join(_REQUIRED_DATASET_KEYS)}"
        )
    _reject_unknown_keys(source, where, entry, DATASET_KEYS)
    for key in _REQUIRED_DATASET_KEYS:
        if key not in entry:
            raise SiteConfigError(f"{source}: required key '{where}{key}' is missing; add it")

    task = entry["task"]
    if not isinstance(task, str) or not _TASK_NAME.match(task):
        raise SiteConfigError(
            f"{source}: key '{where}task' is {task!r}; use the curriculum task name: "
            "lower-case letters, digits and '_', starting with a letter (for example 'ct_seg')"
        )
    kind = _parse_choice(source, where + "kind", entry["kind"], TASK_KINDS)
    modality = _parse_choice(source, where + "modality", entry["modality"], MODALITIES)
    data_format = _parse_choice(source, where + "format", entry["format"], FORMATS)
    manifest = _parse_path(source, where + "manifest", entry["manifest"])

    # Decathlon and nnU-Net datasets carry masks only, so they cannot serve other kinds.
    if data_format != "csv" and kind != "segmentation":
        raise SiteConfigError(
            f"{source}: key '{where}format' is '{data_format}' with kind '{kind}'; "
            f"'{data_format}' datasets hold segmentation masks only, so use format 'csv' "
            "with a 'class' or 'time'/'event' column"
        )
    # A Decathlon dataset stores all channels in one 4D file, which looks the same as a
    # dynamic PET series, so two-channel PET/CT must use another format.
    if data_format == "msd" and modality == "petct":
        raise SiteConfigError(
            f"{source}: key '{where}format' is 'msd' with modality 'petct'; a Decathlon "
            "dataset stores both channels in one 4D file, so use format 'nnunet' "
            "(one file per channel) or 'csv' with 'ct' and 'pet' columns"
        )

    label_map = None
    if entry.get("label_map") is not None:
        if kind != "segmentation":
            raise SiteConfigError(
                f"{source}: key '{where}label_map' is set for kind '{kind}'; a label map "
                "applies to segmentation masks only, so remove it"
            )
        label_map = _parse_label_map(source, where + "label_map", entry["label_map"])

    return DatasetConfig(
        task=task,
        kind=kind,
        modality=modality,
        format=data_format,
        manifest=manifest,
        label_map=label_map,
    )


def _parse_int(value: Any) -> int | None:
    """Return value as an int when it is an integer or a string of digits, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def _parse_label_map(source: Path, key: str, value: Any) -> dict[int, tuple[int, ...]]:
    example = "for example {1: [2, 3]} maps source labels 2 and 3 to task class 1"
    if not isinstance(value, Mapping) or not value:
        raise SiteConfigError(
            f"{source}: key '{key}' is {value!r}; give a mapping task class -> list of "
            f"source label values ({example})"
        )

    label_map: dict[int, tuple[int, ...]] = {}
    claimed: dict[int, int] = {}
    for raw_class, raw_values in value.items():
        task_class = _parse_int(raw_class)
        if task_class is None or task_class < 1:
            raise SiteConfigError(
                f"{source}: key '{key}' has task class {raw_class!r}; task classes are "
                f"integers >= 1 because unlisted values become background 0 ({example})"
            )
        values_list = raw_values if isinstance(raw_values, list) else [raw_values]
        source_values: list[int] = []
        for raw in values_list:
            parsed = _parse_int(raw)
            if parsed is None or parsed < 0:
                raise SiteConfigError(
                    f"{source}: key '{key}.{task_class}' has source value {raw!r}; source "
                    f"label values are integers >= 0 ({example})"
                )
            if parsed in claimed:
                raise SiteConfigError(
                    f"{source}: key '{key}' maps source value {parsed} to classes "
                    f"{claimed[parsed]} and {task_class}; map each source value to one class"
                )
            claimed[parsed] = task_class
            source_values.append(parsed)
        if not source_values:
            raise SiteConfigError(
                f"{source}: key '{key}.{task_class}' lists no source values; "
                f"list at least one ({example})"
            )
        label_map[task_class] = tuple(source_values)
    return dict(sorted(label_map.items()))
