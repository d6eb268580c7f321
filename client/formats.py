"""Readers of the dataset formats a site can declare: CSV manifest, Decathlon, nnU-Net v2.

Each reader turns a dataset into ``CaseRecord`` rows without decoding any image.
``parse_cases`` also returns every issue of the manifest (missing columns, duplicate
case ids, a patient in two splits, invalid survival rows ...), so that
``unicon site check`` can report all of them. ``read_cases`` raises instead.

CSV manifest columns (paths relative to the manifest file, or absolute):

================  =========================================================
``case_id``       required, unique
``patient_id``    required; all rows of a patient must share one split
``ct``, ``pet``   image paths; required by modality (``petct`` needs both)
``label``         mask path; required for segmentation
``class``         integer class; required for classification
``time``          days > 0; required for prognosis
``event``         0 (censored) or 1 (event observed); required for prognosis
``split``         optional: ``train``, ``val`` or ``test``, in every row or in none
================  =========================================================

Decathlon (``msd``) and nnU-Net v2 (``nnunet``) datasets are read as they are.
Their cases have no patient id, so the case id serves as patient id.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import math
import os
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.nifti import RULES, Issue, Severity, describe_issues
from client.site_config import DatasetConfig

SPLITS = ("train", "val", "test")
CSV_COLUMNS = ("case_id", "patient_id", "ct", "pet", "label", "class", "time", "event", "split")

# Channel names in Decathlon 'modality' and nnU-Net 'channel_names' -> image role.
_CHANNEL_ROLES = {"CT": "ct", "CTRES": "ct", "PET": "pet", "PT": "pet", "SUV": "pet"}


class DatasetError(ValueError):
    """A dataset's manifest or description has errors; the message lists the first ones.

    Attributes
    ----------
    issues : list[Issue]
        Every issue found, warnings included.
    """

    def __init__(self, message: str, issues: list[Issue]) -> None:
        super().__init__(message)
        self.issues = issues


@dataclass(frozen=True)
class CaseRecord:
    """One case of a dataset, before any image is decoded.

    Attributes
    ----------
    case_id, patient_id : str
        Identifiers; the patient id groups cases for splitting.
    images : dict[str, Path]
        Image role (``ct``, ``pet``) -> absolute file path.
    label : Path or None
        Mask path, for segmentation.
    class_label : int or None
        Class, for classification.
    time : float or None
        Follow-up in days, for prognosis.
    event : int or None
        1 = event observed, 0 = censored, for prognosis.
    split : str or None
        ``train``, ``val`` or ``test`` from the manifest; None when it sets none.
    """

    case_id: str
    patient_id: str
    images: dict[str, Path]
    label: Path | None = None
    class_label: int | None = None
    time: float | None = None
    event: int | None = None
    split: str | None = None

    def files(self) -> list[Path]:
        """Return every file of the case: images in channel order, then the label."""
        files = list(self.images.values())
        if self.label is not None:
            files.append(self.label)
        return files


def required_columns(dataset: DatasetConfig) -> tuple[str, ...]:
    """Return the CSV columns a dataset needs, from its kind and modality."""
    columns = ["case_id", "patient_id"]
    columns += ["ct", "pet"] if dataset.modality == "petct" else [dataset.modality]
    if dataset.kind == "segmentation":
        columns.append("label")
    elif dataset.kind == "classification":
        columns.append("class")
    else:
        columns += ["time", "event"]
    return tuple(columns)


def read_cases(dataset: DatasetConfig, num_classes: int | None = None) -> list[CaseRecord]:
    """Read the cases of a dataset.

    Parameters
    ----------
    dataset : DatasetConfig
        The dataset entry of a site config.
    num_classes : int, optional
        Number of task classes; when given, classification rows are checked against it.

    Returns
    -------
    list[CaseRecord]
        In manifest order.

    Raises
    ------
    DatasetError
        When the manifest has any error (see ``parse_cases``).
    """
    cases, issues = parse_cases(dataset, num_classes)
    if any(issue.severity is Severity.ERROR for issue in issues):
        raise DatasetError(
            f"dataset of task '{dataset.task}' ({dataset.manifest}) has errors; run "
            f"'unicon site check' for the full report:\n{describe_issues(issues)}",
            issues,
        )
    return cases


def parse_cases(
    dataset: DatasetConfig, num_classes: int | None = None
) -> tuple[list[CaseRecord], list[Issue]]:
    """Read the cases of a dataset and every issue of its manifest.

    Rows with errors are left out of the returned cases. Image files are not opened.

    Returns
    -------
    tuple[list[CaseRecord], list[Issue]]
        The valid cases and the issues (errors and warnings).
    """
    issues: list[Issue] = []
    if dataset.format == "csv":
        cases = _read_csv(dataset, num_classes, issues)
    elif dataset.format == "msd":
        cases = _read_msd(dataset, issues)
    else:
        cases = _read_nnunet(dataset, issues)

    _check_unique_cases(dataset.manifest, cases, issues)
    if not cases and not any(issue.severity is Severity.ERROR for issue in issues):
        issues.append(RULES["no-cases"].issue(dataset.manifest, "rows", 0))
    return cases, issues


# --------------------------------------------------------------------------- CSV


def _resolve(base: Path, value: str) -> Path:
    return Path(os.path.abspath(base / os.path.expanduser(value)))


def _read_csv_rows(path: Path, issues: list[Issue]) -> list[dict[str, str]] | None:
    if not path.is_file():
        issues.append(RULES["file-missing"].issue(path, "manifest", path))
        return None
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        issues.append(RULES["manifest-unreadable"].issue(path, "manifest", path.name, str(error)))
        return None
    first_line = text.splitlines()[0] if text.strip() else ""
    # Spreadsheets in many locales save CSV with ';' between fields.
    delimiter = ";" if first_line.count(";") > first_line.count(",") else ","
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    if not reader.fieldnames:
        issues.append(RULES["manifest-unreadable"].issue(path, "header", "empty file"))
        return None
    reader.fieldnames = [name.strip() for name in reader.fieldnames]
    try:
        return [
            {key: (value or "").strip() for key, value in row.items() if key is not None}
            for row in reader
        ]
    except csv.Error as error:
        issues.append(RULES["manifest-unreadable"].issue(path, "rows", path.name, str(error)))
        return None


def _read_csv(
    dataset: DatasetConfig, num_classes: int | None, issues: list[Issue]
) -> list[CaseRecord]:
    path = dataset.manifest
    rows = _read_csv_rows(path, issues)
    if rows is None:
        return []
    header = list(rows[0]) if rows else _header_of(path)

    required = required_columns(dataset)
    for column in header:
        if column not in CSV_COLUMNS:
            close = difflib.get_close_matches(column, CSV_COLUMNS, n=1)
            hint = f"did you mean '{close[0]}'?" if close else ""
            issues.append(RULES["unknown-column"].issue(path, "header", column, hint))
    missing = [column for column in required if column not in header]
    for column in missing:
        close = difflib.get_close_matches(column, header, n=1)
        hint = f"found '{close[0]}', rename it to '{column}'" if close else ""
        issues.append(
            RULES["missing-column"].issue(
                path, column, "absent",
                f"kind '{dataset.kind}' with modality '{dataset.modality}' needs "
                f"{', '.join(required)}" + (f"; {hint}" if hint else ""),
            )
        )
    if missing:
        return []

    has_split = "split" in header and any(row.get("split") for row in rows)
    cases: list[CaseRecord] = []
    for index, row in enumerate(rows):
        # Row numbers count the header as line 1, as spreadsheets show them.
        case = _parse_csv_row(dataset, row, index + 2, has_split, num_classes, issues)
        if case is not None:
            cases.append(case)
    return cases


def _header_of(path: Path) -> list[str]:
    with path.open(encoding="utf-8-sig") as handle:
        first_line = handle.readline()
    delimiter = ";" if first_line.count(";") > first_line.count(",") else ","
    return [name.strip() for name in first_line.strip().split(delimiter) if name.strip()]


def _parse_csv_row(
    dataset: DatasetConfig,
    row: Mapping[str, str],
    line: int,
    has_split: bool,
    num_classes: int | None,
    issues: list[Issue],
) -> CaseRecord | None:
    path = dataset.manifest
    errors_before = sum(issue.severity is Severity.ERROR for issue in issues)

    def where(column: str) -> str:
        return f"{column} (row {line})"

    for column in required_columns(dataset):
        if not row.get(column):
            issues.append(RULES["missing-value"].issue(path, where(column), "''"))
    if sum(issue.severity is Severity.ERROR for issue in issues) > errors_before:
        return None

    roles = ("ct", "pet") if dataset.modality == "petct" else (dataset.modality,)
    images = {role: _resolve(path.parent, row[role]) for role in roles}
    label = None
    if dataset.kind == "segmentation":
        label = _resolve(path.parent, row["label"])

    class_label = None
    if dataset.kind == "classification":
        class_label = _parse_integer(row["class"])
        valid = class_label is not None and class_label >= 0
        if valid and num_classes is not None and class_label is not None:
            valid = class_label < num_classes
        if not valid:
            limit = f"0..{num_classes - 1}" if num_classes is not None else "integers >= 0"
            issues.append(
                RULES["invalid-class"].issue(
                    path, where("class"), row["class"], f"allowed: {limit}"
                )
            )

    time = event = None
    if dataset.kind == "prognosis":
        time = _parse_float(row["time"])
        if time is None or not math.isfinite(time) or time <= 0:
            issues.append(RULES["invalid-survival-time"].issue(path, where("time"), row["time"]))
        event_value = _parse_integer(row["event"])
        if event_value not in (0, 1):
            issues.append(
                RULES["invalid-survival-event"].issue(path, where("event"), row["event"])
            )
        event = event_value

    split = row.get("split") or None
    if has_split and split not in SPLITS:
        close = difflib.get_close_matches(split or "", SPLITS, n=1)
        hint = f"did you mean '{close[0]}'?" if close else ""
        issues.append(RULES["invalid-split"].issue(path, where("split"), repr(split or ""), hint))

    if sum(issue.severity is Severity.ERROR for issue in issues) > errors_before:
        return None
    return CaseRecord(
        case_id=row["case_id"],
        patient_id=row["patient_id"],
        images=images,
        label=label,
        class_label=class_label,
        time=time,
        event=event,
        split=split,
    )


def _parse_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _parse_integer(text: str) -> int | None:
    """Parse '1' or '1.0' as 1; anything fractional or non-numeric gives None."""
    value = _parse_float(text)
    if value is None or not math.isfinite(value) or not value.is_integer():
        return None
    return int(value)


def _check_unique_cases(manifest: Path, cases: list[CaseRecord], issues: list[Issue]) -> None:
    """Report duplicate case ids and patients whose cases sit in more than one split."""
    seen: set[str] = set()
    for case in cases:
        if case.case_id in seen:
            issues.append(RULES["duplicate-case-id"].issue(manifest, "case_id", case.case_id))
        seen.add(case.case_id)

    splits_of_patient: dict[str, set[str]] = defaultdict(set)
    for case in cases:
        if case.split is not None:
            splits_of_patient[case.patient_id].add(case.split)
    for patient, splits in splits_of_patient.items():
        if len(splits) > 1:
            issues.append(
                RULES["patient-in-several-splits"].issue(
                    manifest, "patient_id", patient, f"splits {', '.join(sorted(splits))}"
                )
            )


# --------------------------------------------------------------------------- dataset.json


def _load_dataset_json(path: Path, issues: list[Issue]) -> dict[str, Any] | None:
    if not path.is_file():
        issues.append(RULES["file-missing"].issue(path, "dataset.json", path))
        return None
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        issues.append(
            RULES["dataset-json-invalid"].issue(path, "dataset.json", path.name, str(error))
        )
        return None
    if not isinstance(document, dict):
        issues.append(
            RULES["dataset-json-invalid"].issue(path, "dataset.json", type(document).__name__,
                                               "expected a JSON object")
        )
        return None
    return document


def _channel_roles(
    path: Path, key: str, channels: Any, modality: str, issues: list[Issue]
) -> dict[str, str] | None:
    """Map channel indices ('0', '1') to image roles and check them against the modality."""
    if not isinstance(channels, dict) or not channels:
        issues.append(
            RULES["dataset-json-invalid"].issue(path, key, channels, 'expected e.g. {"0": "CT"}')
        )
        return None
    roles: dict[str, str] = {}
    for index, name in channels.items():
        role = _CHANNEL_ROLES.get(str(name).strip().upper())
        if role is None:
            issues.append(
                RULES["dataset-json-invalid"].issue(
                    path, f"{key}.{index}", name,
                    f"channel names understood: {', '.join(sorted(_CHANNEL_ROLES))}",
                )
            )
            return None
        roles[str(index)] = role
    expected = ["ct", "pet"] if modality == "petct" else [modality]
    if sorted(roles.values()) != sorted(expected):
        issues.append(
            RULES["dataset-json-invalid"].issue(
                path, key, channels,
                f"modality '{modality}' in the site YAML needs channels {', '.join(expected)}",
            )
        )
        return None
    return roles


def _case_id_of(file_name: str) -> str:
    for ending in (".nii.gz", ".nii"):
        if file_name.endswith(ending):
            return file_name[: -len(ending)]
    return file_name


def _read_msd(dataset: DatasetConfig, issues: list[Issue]) -> list[CaseRecord]:
    """Read a Medical Segmentation Decathlon ``dataset.json`` (single-channel only)."""
    path = dataset.manifest
    document = _load_dataset_json(path, issues)
    if document is None:
        return []
    roles = _channel_roles(path, "modality", document.get("modality"), dataset.modality, issues)
    training = document.get("training")
    if not isinstance(training, list):
        issues.append(
            RULES["dataset-json-invalid"].issue(
                path, "training", type(training).__name__,
                'expected a list of {"image": ..., "label": ...}',
            )
        )
        return []
    if roles is None:
        return []
    role = next(iter(roles.values()))

    cases: list[CaseRecord] = []
    for index, entry in enumerate(training):
        if not (isinstance(entry, dict) and isinstance(entry.get("image"), str)
                and isinstance(entry.get("label"), str)):
            issues.append(
                RULES["dataset-json-invalid"].issue(
                    path, f"training[{index}]", entry, 'expected {"image": ..., "label": ...}'
                )
            )
            continue
        image = _resolve(path.parent, entry["image"])
        case_id = _case_id_of(image.name)
        cases.append(
            CaseRecord(
                case_id=case_id,
                patient_id=case_id,
                images={role: image},
                label=_resolve(path.parent, entry["label"]),
            )
        )
    return cases


def _read_nnunet(dataset: DatasetConfig, issues: list[Issue]) -> list[CaseRecord]:
    """Read an nnU-Net v2 raw dataset folder (``imagesTr/``, ``labelsTr/``, ``dataset.json``)."""
    folder = dataset.manifest
    path = folder / "dataset.json"
    document = _load_dataset_json(path, issues)
    if document is None:
        return []
    roles = _channel_roles(
        path, "channel_names", document.get("channel_names"), dataset.modality, issues
    )
    ending = document.get("file_ending")
    if not isinstance(ending, str) or not ending.startswith(".nii"):
        issues.append(
            RULES["dataset-json-invalid"].issue(
                path, "file_ending", ending, "only NIfTI ('.nii.gz' or '.nii') is read"
            )
        )
        return []
    labels_folder = folder / "labelsTr"
    if not labels_folder.is_dir():
        issues.append(RULES["file-missing"].issue(labels_folder, "labelsTr", labels_folder))
        return []
    if roles is None:
        return []

    cases: list[CaseRecord] = []
    for label in sorted(labels_folder.iterdir()):
        if not label.name.endswith(ending) or label.name.startswith("."):
            continue
        case_id = label.name[: -len(ending)]
        images = {
            role: Path(os.path.abspath(folder / "imagesTr" / f"{case_id}_{int(index):04d}{ending}"))
            for index, role in roles.items()
        }
        cases.append(
            CaseRecord(case_id=case_id, patient_id=case_id, images=images,
                       label=Path(os.path.abspath(label)))
        )
    expected = document.get("numTraining")
    if isinstance(expected, int) and expected != len(cases):
        issues.append(
            RULES["dataset-json-invalid"].issue(
                path, "numTraining", expected, f"labelsTr holds {len(cases)} masks"
            )
        )
    return cases
