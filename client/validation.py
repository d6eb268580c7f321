"""``unicon site check``: decode every file of a site and report problems per file.

The check runs the same readers and fault rules as the preprocessing
(``client.formats``, ``client.nifti``), so a site that passes the check loads at
training time. It only reads: no source file is modified and nothing is cached.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.formats import CaseRecord, parse_cases
from client.nifti import RULES, Issue, Severity, load_case_volumes
from client.site_config import DatasetConfig, SiteConfig
from unicon_model.log import get_logger

logger = get_logger(__name__)


@dataclass
class DatasetSummary:
    """Counts for one dataset of a checked site."""

    task: str
    kind: str
    modality: str
    manifest: str
    num_classes: int
    cases: int = 0
    usable_cases: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Return the summary as a JSON-ready mapping."""
        return dict(self.__dict__)


@dataclass
class SiteReport:
    """The result of checking a site.

    Attributes
    ----------
    site : str
        Site id.
    source : str
        The site YAML file.
    files : list[str]
        Every file checked (manifests and images), in check order, without repeats.
    issues : list[Issue]
        Every issue found.
    datasets : list[DatasetSummary]
        Case counts per dataset.
    """

    site: str
    source: str
    files: list[str] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    datasets: list[DatasetSummary] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether the site is usable: no issue of severity error."""
        return not any(issue.severity is Severity.ERROR for issue in self.issues)

    def count(self, severity: Severity) -> int:
        """Return the number of issues of one severity."""
        return sum(issue.severity is severity for issue in self.issues)

    def to_dict(self) -> dict[str, Any]:
        """Return the report as a JSON-ready mapping (``ok``, counts, files, issues)."""
        by_file: dict[str, list[dict[str, str]]] = {name: [] for name in self.files}
        for issue in self.issues:
            by_file.setdefault(issue.file, []).append(issue.to_dict())
        return {
            "site": self.site,
            "source": self.source,
            "ok": self.ok,
            "errors": self.count(Severity.ERROR),
            "warnings": self.count(Severity.WARNING),
            "fixed": self.count(Severity.FIXED),
            "datasets": [summary.to_dict() for summary in self.datasets],
            "files": [{"file": name, "issues": issues} for name, issues in by_file.items()],
        }

    def to_text(self) -> str:
        """Return the report as text: one block per file, then a summary."""
        by_file: dict[str, list[Issue]] = {name: [] for name in self.files}
        for issue in self.issues:
            by_file.setdefault(issue.file, []).append(issue)

        lines = [f"site {self.site} ({self.source})"]
        for name, issues in by_file.items():
            status = "ok" if not issues else ", ".join(
                f"{sum(i.severity is s for i in issues)} {s.value}"
                for s in Severity
                if any(i.severity is s for i in issues)
            )
            lines.append(f"{name}: {status}")
            for issue in issues:
                lines.append(
                    f"  {issue.severity.value} [{issue.rule}] {issue.field}: {issue.value}"
                )
                lines.append(f"      {issue.message}")
                lines.append(f"      fix: {issue.fix}")
        lines.append("")
        for summary in self.datasets:
            lines.append(
                f"task {summary.task} ({summary.kind}, {summary.modality}, "
                f"{summary.num_classes} classes): {summary.usable_cases} of {summary.cases} "
                "cases usable"
            )
        verdict = "usable" if self.ok else "NOT usable; fix the errors above"
        lines.append(
            f"{len(self.files)} files checked: {self.count(Severity.ERROR)} errors, "
            f"{self.count(Severity.WARNING)} warnings, {self.count(Severity.FIXED)} fixed. "
            f"Site {verdict}."
        )
        return "\n".join(lines)


def check_site(config: SiteConfig, num_classes: Mapping[str, int] | None = None) -> SiteReport:
    """Decode and check every file of every dataset of a site.

    Parameters
    ----------
    config : SiteConfig
        The site.
    num_classes : Mapping[str, int], optional
        Task -> number of classes (background included). A task not listed takes
        ``DatasetConfig.default_num_classes()``: max label_map key + 1, else 2.

    Returns
    -------
    SiteReport
        ``ok`` is False when any error was found.
    """
    report = SiteReport(site=config.site, source=str(config.source))
    for dataset in config.datasets:
        classes = (num_classes or {}).get(dataset.task, dataset.default_num_classes())
        _check_dataset(dataset, classes, report)
    logger.info(
        "checked site %s: %d files, %d errors, %d warnings, %d fixed",
        config.site, len(report.files), report.count(Severity.ERROR),
        report.count(Severity.WARNING), report.count(Severity.FIXED),
    )
    return report


def _add_file(report: SiteReport, path: Path) -> None:
    name = str(path)
    if name not in report.files:
        report.files.append(name)


def _check_dataset(dataset: DatasetConfig, num_classes: int, report: SiteReport) -> None:
    summary = DatasetSummary(
        task=dataset.task,
        kind=dataset.kind,
        modality=dataset.modality,
        manifest=str(dataset.manifest),
        num_classes=num_classes,
    )
    report.datasets.append(summary)
    manifest = dataset.manifest / "dataset.json" if dataset.format == "nnunet" else dataset.manifest
    _add_file(report, manifest)

    if dataset.label_map is not None and max(dataset.label_map) >= num_classes:
        report.issues.append(
            RULES["label-map-classes"].issue(
                manifest, f"label_map of task {dataset.task}", sorted(dataset.label_map),
                f"the task has {num_classes} classes",
            )
        )

    cases, issues = parse_cases(dataset, num_classes)
    report.issues.extend(issues)
    summary.cases = len(cases)
    for case in cases:
        if _check_case(dataset, case, num_classes, report):
            summary.usable_cases += 1


def _check_case(
    dataset: DatasetConfig, case: CaseRecord, num_classes: int, report: SiteReport
) -> bool:
    for path in case.files():
        _add_file(report, path)
    label = case.label if dataset.kind == "segmentation" else None
    loaded = load_case_volumes(case.images, label, dataset.modality, dataset.label_map, num_classes)
    report.issues.extend(loaded.issues)
    logger.debug("checked case %s of task %s: %d issues", case.case_id, dataset.task,
                 len(loaded.issues))
    return loaded.ok
