"""Decoding of NIfTI studies and the fault rules of site data.

Every kind of fault that site data can show is one entry of ``RULES``: its code,
its severity (``error`` rejects the case, ``warning`` and ``fixed`` let it through),
what is wrong and the fix. Detection code reports a fault only through
``RULES[code].issue(...)``, so a rule's wording and severity live in one place.
``unicon site check`` and the preprocessing share the decoding below, so a case is
fixed the same way at check time and at training time.

Arrays keep nibabel's axis order ``(X, Y, Z)`` and its affine, which maps voxel
indices to RAS+ world millimetres whatever the orientation stored in the file.
Files are decoded with nibabel directly rather than through MONAI's
``NibabelReader`` because the rules need the raw bytes and the raw header
(scaling, dtype, frame count). The voxel values are the same: ``img.dataobj``
with ``scl_slope``/``scl_inter`` applied.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
from nibabel.arrayproxy import ArrayProxy
from scipy import ndimage

from unicon_model.log import get_logger

logger = get_logger(__name__)

GZIP_MAGIC = b"\x1f\x8b"

# Float label values this close to an integer are rounded; anything further is fractional.
LABEL_ROUNDING_TOLERANCE = 1e-3
# A "label" with more distinct values than this (or with negative values) is an image.
LABEL_MAX_DISTINCT_VALUES = 256
# Affines closer than this (in mm, element-wise) describe the same grid.
AFFINE_TOLERANCE_MM = 1e-3

# Manifest columns (image roles) of each modality, in channel order.
MODALITY_CHANNELS: dict[str, tuple[str, ...]] = {
    "ct": ("ct",),
    "pet": ("pet",),
    "petct": ("ct", "pet"),
}


class Severity(StrEnum):
    """Severity of a fault: errors reject the case, warnings and fixes let it through."""

    ERROR = "error"
    WARNING = "warning"
    FIXED = "fixed"


@dataclass(frozen=True)
class Issue:
    """One problem found in one file (or manifest row).

    Attributes
    ----------
    rule : str
        Code of the rule in ``RULES`` that found it.
    severity : Severity
        The rule's severity.
    file : str
        The file (or manifest) concerned.
    field : str
        Where in the file: a manifest column and row, a header field, or an image role.
    value : str
        The value found.
    message : str
        What is wrong.
    fix : str
        What to do about it (or what was done).
    """

    rule: str
    severity: Severity
    file: str
    field: str
    value: str
    message: str
    fix: str

    def to_dict(self) -> dict[str, str]:
        """Return the issue as a JSON-ready mapping."""
        return {
            "severity": self.severity.value,
            "rule": self.rule,
            "file": self.file,
            "field": self.field,
            "value": self.value,
            "message": self.message,
            "fix": self.fix,
        }

    def to_text(self) -> str:
        """Return one line: severity, rule, field, value, message and fix."""
        return (
            f"{self.severity.value}: [{self.rule}] {self.field} = {self.value}: "
            f"{self.message}. Fix: {self.fix}"
        )


@dataclass(frozen=True)
class FaultRule:
    """One kind of fault: its code, severity, description and fix."""

    code: str
    severity: Severity
    summary: str
    fix: str

    def issue(self, file: str | Path, field: str, value: object, detail: str = "") -> Issue:
        """Build an issue of this rule; ``detail`` is appended to the summary."""
        message = f"{self.summary} ({detail})" if detail else self.summary
        return Issue(
            rule=self.code,
            severity=self.severity,
            file=str(file),
            field=field,
            value=str(value),
            message=message,
            fix=self.fix,
        )


_E, _W, _F = Severity.ERROR, Severity.WARNING, Severity.FIXED

RULES: dict[str, FaultRule] = {
    rule.code: rule
    for rule in (
        # Files and encoding.
        FaultRule(
            "file-missing",
            _E,
            "file not found",
            "correct the path where it is declared (a dataset's `manifest` in the site YAML is "
            "relative to the YAML file; paths in a manifest are relative to the manifest) or "
            "restore the file",
        ),
        FaultRule(
            "unsupported-file-type",
            _E,
            "not a NIfTI file name (.nii or .nii.gz)",
            "convert the study to NIfTI (.nii.gz), for example with dcm2niix",
        ),
        FaultRule(
            "compression-mismatch",
            _F,
            "file content is not compressed as its name says; decoded by content",
            "rename the file: '.nii' for uncompressed content, '.nii.gz' for gzip content",
        ),
        FaultRule(
            "file-truncated",
            _E,
            "file ends before all of its voxels are stored",
            "copy or export the file again, because the transfer or conversion was cut short",
        ),
        FaultRule(
            "nifti-unreadable",
            _E,
            "not a valid NIfTI-1 or NIfTI-2 file",
            "export the study again as NIfTI",
        ),
        # Header.
        FaultRule(
            "not-3d",
            _E,
            "fewer than three spatial dimensions",
            "export the whole 3D volume, not a single slice",
        ),
        FaultRule(
            "single-frame-4d",
            _F,
            "4D file with a single frame; squeezed to 3D",
            "nothing is needed; export as 3D to silence this message",
        ),
        FaultRule(
            "multi-frame-4d",
            _E,
            "4D file with several frames, for example a dynamic PET series",
            "export one static 3D frame (for PET the static or summed frame, in SUV)",
        ),
        FaultRule(
            "no-orientation",
            _W,
            "header has qform_code and sform_code 0, so orientation and origin are guessed "
            "from the voxel sizes and pairing by affine may be wrong",
            "convert the study again with a tool that writes the scanner orientation "
            "(for example dcm2niix)",
        ),
        FaultRule(
            "label-scaling",
            _E,
            "label file has scl_slope/scl_inter scaling, so its voxel values are not the "
            "stored integers",
            "save the mask as an integer type with scl_slope 0 or 1 and scl_inter 0",
        ),
        # Voxel values.
        FaultRule(
            "non-finite-voxels",
            _E,
            "NaN or infinite voxel values",
            "write a corrected copy with the NaN and infinite voxels replaced by the "
            "background value and point the manifest at it",
        ),
        FaultRule(
            "pet-integer-overflow",
            _E,
            "large negative PET values next to high uptake, the signature of integer "
            "overflow at export",
            "export the PET again as float32, or as int16 with a scl_slope that keeps the "
            "maximum stored value below 32767",
        ),
        FaultRule(
            "label-near-integer",
            _W,
            f"float label values within {LABEL_ROUNDING_TOLERANCE:g} of integers; rounded",
            "save the mask as an integer type (uint8)",
        ),
        FaultRule(
            "label-fractional",
            _E,
            "label has fractional values, so it is not a mask",
            "export the mask as integers, resampled with nearest-neighbour interpolation",
        ),
        FaultRule(
            "label-values",
            _E,
            "label values are not classes of the task",
            "point the label column at the mask, or add a label_map to this dataset in the "
            "site YAML (task class -> source values; unlisted values become background)",
        ),
        FaultRule(
            "label-map-classes",
            _E,
            "label_map uses task classes the task does not have",
            "map source values to task classes 1..K-1, where K is the task's number of classes",
        ),
        # Pairing of files by physical space.
        FaultRule(
            "grid-mismatch",
            _F,
            "different grid (shape, spacing, orientation or origin) than the reference; "
            "resampled onto the reference grid by affine",
            "nothing is needed when both files come from the same frame of reference",
        ),
        FaultRule(
            "shape-off-by-one",
            _W,
            "same affine but the shape differs by one voxel; padded or cropped",
            "check the export, because converters that drop or add an edge slice cause this",
        ),
        FaultRule(
            "no-overlap",
            _E,
            "no spatial overlap with the reference by the affines",
            "pair files of the same study; check that both come from the same frame of "
            "reference and that the affines are correct",
        ),
        # Manifests and dataset descriptions.
        FaultRule(
            "manifest-unreadable",
            _E,
            "manifest cannot be read",
            "save the manifest as UTF-8 CSV with a header row",
        ),
        FaultRule(
            "dataset-json-invalid",
            _E,
            "dataset description is invalid",
            "follow the Decathlon (msd) or nnU-Net v2 (nnunet) dataset.json layout",
        ),
        FaultRule(
            "missing-column",
            _E,
            "required column is missing",
            "add the column to the manifest header",
        ),
        FaultRule(
            "unknown-column",
            _W,
            "column is not used and is ignored",
            "rename it if it was meant to be one of the manifest columns",
        ),
        FaultRule(
            "missing-value",
            _E,
            "required value is empty",
            "fill the cell, or remove the row",
        ),
        FaultRule(
            "duplicate-case-id",
            _E,
            "case_id appears in more than one row",
            "give every row its own case_id",
        ),
        FaultRule(
            "patient-in-several-splits",
            _E,
            "the same patient_id is in more than one split, which leaks test data into training",
            "put all rows of a patient in one split",
        ),
        FaultRule(
            "invalid-split",
            _E,
            "split must be train, val or test",
            "write train, val or test in every row, or leave the column empty in every row "
            "for the deterministic patient-level split",
        ),
        FaultRule(
            "invalid-class",
            _E,
            "class is not an integer class of the task",
            "write the class as an integer 0..K-1, where K is the task's number of classes",
        ),
        FaultRule(
            "invalid-survival-time",
            _E,
            "survival time must be a number of days > 0",
            "write the follow-up time in days; rows with zero follow-up carry no information",
        ),
        FaultRule(
            "invalid-survival-event",
            _E,
            "event must be 0 (censored) or 1 (event observed)",
            "write 1 when the event was observed and 0 when follow-up ended without it",
        ),
        FaultRule(
            "no-cases",
            _E,
            "dataset has no cases",
            "add cases to the manifest",
        ),
    )
}


@dataclass
class Volume:
    """A decoded 3D volume.

    Attributes
    ----------
    path : Path
        The file it came from.
    role : str
        ``ct``, ``pet`` or ``label``.
    array : np.ndarray
        ``(X, Y, Z)``; float32 for images (scaling applied), an integer dtype for labels.
    affine : np.ndarray
        ``(4, 4)`` voxel index -> RAS+ world millimetres.
    """

    path: Path
    role: str
    array: np.ndarray
    affine: np.ndarray


@dataclass
class LoadedCase:
    """The volumes of one case on one reference grid, with the issues found on the way.

    Attributes
    ----------
    image : np.ndarray or None
        ``(C, X, Y, Z)`` float32; channels in ``MODALITY_CHANNELS`` order (CT first).
        None when an error rejected the case.
    label : np.ndarray or None
        ``(X, Y, Z)`` integer task classes after the label map, on the image grid; None
        for tasks without masks or when an error rejected the case.
    affine : np.ndarray or None
        ``(4, 4)`` affine of the reference grid (the CT for PET/CT).
    issues : list[Issue]
        Every issue found, errors included.
    """

    image: np.ndarray | None = None
    label: np.ndarray | None = None
    affine: np.ndarray | None = None
    issues: list[Issue] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether no error was found."""
        return not any(issue.severity is Severity.ERROR for issue in self.issues)


def describe_grid(shape: tuple[int, ...], affine: np.ndarray) -> str:
    """Describe a grid as orientation, shape, spacing and origin, for messages."""
    codes = "".join(nib.aff2axcodes(affine))
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    return (
        f"{codes} {'x'.join(str(n) for n in shape)} voxels of "
        f"{'x'.join(f'{s:.3g}' for s in spacing)} mm at origin "
        f"({', '.join(f'{o:.1f}' for o in affine[:3, 3])})"
    )


# --------------------------------------------------------------------------- decoding


def _read_nifti_bytes(path: Path, field: str, issues: list[Issue]) -> bytes | None:
    """Return the decompressed bytes of a NIfTI file, or None after reporting an error."""
    name = path.name.lower()
    if not path.is_file():
        issues.append(RULES["file-missing"].issue(path, field, path))
        return None
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        issues.append(RULES["unsupported-file-type"].issue(path, field, path.name))
        return None

    raw = path.read_bytes()
    is_gzip = raw[:2] == GZIP_MAGIC
    named_gzip = name.endswith(".gz")
    if is_gzip != named_gzip:
        found = "gzip content" if is_gzip else "uncompressed content"
        issues.append(RULES["compression-mismatch"].issue(path, field, path.name, found))
    if not is_gzip:
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        issues.append(
            RULES["file-truncated"].issue(path, field, f"{len(raw)} bytes", f"gzip: {error}")
        )
        return None


def _parse_nifti(
    path: Path, field: str, content: bytes, issues: list[Issue]
) -> nib.Nifti1Image | None:
    """Parse NIfTI-1 or NIfTI-2 bytes and check that every voxel is present."""
    image: nib.Nifti1Image
    try:
        header_size = int.from_bytes(content[:4], "little")
        if header_size not in (348, 540):
            header_size = int.from_bytes(content[:4], "big")
        image_class = nib.Nifti2Image if header_size == 540 else nib.Nifti1Image
        image = image_class.from_bytes(content)
    except Exception as error:  # nibabel raises many types for malformed headers
        issues.append(
            RULES["nifti-unreadable"].issue(path, field, f"{len(content)} bytes", str(error))
        )
        return None

    proxy = cast(ArrayProxy, image.dataobj)
    expected = int(proxy.offset) + int(np.prod(proxy.shape)) * np.dtype(proxy.dtype).itemsize
    if len(content) < expected:
        issues.append(
            RULES["file-truncated"].issue(
                path,
                field,
                f"{len(content)} bytes",
                f"the header promises {expected} bytes of voxel data and header",
            )
        )
        return None
    return image


def _squeeze_to_3d(
    path: Path, field: str, role: str, shape: tuple[int, ...], issues: list[Issue]
) -> tuple[int, int, int] | None:
    """Return the 3D shape, reporting single-frame 4D files (fixed) and series (error)."""
    if len(shape) < 3 or min(shape[:3]) < 1:
        issues.append(RULES["not-3d"].issue(path, field, shape))
        return None
    extra = shape[3:]
    if extra and int(np.prod(extra)) > 1:
        kind = "a dynamic PET series" if role == "pet" else "a series"
        issues.append(
            RULES["multi-frame-4d"].issue(
                path, field, shape, f"{int(np.prod(extra))} frames, {kind}"
            )
        )
        return None
    if extra:
        issues.append(RULES["single-frame-4d"].issue(path, field, shape))
        logger.info("squeezed single-frame 4D file %s from shape %s to 3D", path, shape)
    return (int(shape[0]), int(shape[1]), int(shape[2]))


def decode_volume(path: Path, role: str, issues: list[Issue], field: str = "") -> Volume | None:
    """Decode one NIfTI file, applying the file, header and voxel rules.

    Parameters
    ----------
    path : Path
        The ``.nii`` or ``.nii.gz`` file.
    role : str
        ``ct``, ``pet`` or ``label``.
    issues : list[Issue]
        Receives every issue found.
    field : str, optional
        Field name for the issues (default: the role).

    Returns
    -------
    Volume or None
        Images as float32 with ``scl_slope``/``scl_inter`` applied (slope 0 or NaN
        means no scaling, as the NIfTI-1 standard defines). Labels as integers after the
        rounding rule. None when an error rule fired.
    """
    field = field or role
    content = _read_nifti_bytes(path, field, issues)
    if content is None:
        return None
    image = _parse_nifti(path, field, content, issues)
    if image is None:
        return None
    shape3 = _squeeze_to_3d(path, field, role, tuple(image.shape), issues)
    if shape3 is None:
        return None

    header = image.header
    if int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0:
        issues.append(RULES["no-orientation"].issue(path, "qform_code/sform_code", "0/0"))

    proxy = cast(ArrayProxy, image.dataobj)
    slope, inter = float(proxy.slope), float(proxy.inter)
    if role == "label":
        if slope != 1.0 or inter != 0.0:
            issues.append(
                RULES["label-scaling"].issue(path, "scl_slope/scl_inter", f"{slope:g}/{inter:g}")
            )
            return None
        raw = np.asanyarray(proxy).reshape(shape3)
        labels = _decode_label_values(path, field, raw, issues)
        if labels is None:
            return None
        return Volume(path=path, role=role, array=labels, affine=image.affine.copy())

    array = np.asarray(image.get_fdata(dtype=np.float32)).reshape(shape3)
    if slope != 1.0 or inter != 0.0:
        logger.debug("applied scl_slope %g and scl_inter %g to %s", slope, inter, path)
    if not _check_finite(path, field, array, issues):
        return None
    if role == "pet" and not _check_pet_overflow(path, field, array, issues):
        return None
    return Volume(path=path, role=role, array=array, affine=image.affine.copy())


def _check_finite(path: Path, field: str, array: np.ndarray, issues: list[Issue]) -> bool:
    if array.dtype.kind != "f":
        return True
    bad = ~np.isfinite(array)
    count = int(bad.sum())
    if count:
        issues.append(
            RULES["non-finite-voxels"].issue(
                path,
                field,
                f"{count} of {array.size} voxels",
                f"{int(np.isnan(array).sum())} NaN",
            )
        )
        return False
    return True


def _check_pet_overflow(path: Path, field: str, array: np.ndarray, issues: list[Issue]) -> bool:
    """Reject PET whose strongly negative voxels touch high uptake (wrapped integers).

    Activity cannot be negative, but reconstruction noise gives small negative values,
    which preprocessing clips. A value below -25 % of the maximum that touches a voxel
    above 50 % of the maximum is a hot spot whose stored integer wrapped around.
    """
    peak = float(array.max())
    if peak <= 0.0:
        return True
    strongly_negative = array < -0.25 * peak
    if not strongly_negative.any():
        return True
    hot_neighbourhood = ndimage.binary_dilation(array > 0.5 * peak, structure=np.ones((3, 3, 3)))
    wrapped = strongly_negative & hot_neighbourhood
    if not wrapped.any():
        return True
    issues.append(
        RULES["pet-integer-overflow"].issue(
            path,
            field,
            f"minimum {float(array.min()):.4g} next to maximum {peak:.4g}",
            f"{int(wrapped.sum())} voxels",
        )
    )
    return False


def _decode_label_values(
    path: Path, field: str, raw: np.ndarray, issues: list[Issue]
) -> np.ndarray | None:
    """Return label values as integers, rounding near-integer floats (warning).

    Integer files keep their dtype, so that large masks are not copied to int64.
    """
    if raw.dtype.kind in "iub":
        return raw
    if not _check_finite(path, field, raw, issues):
        return None
    rounded = np.rint(raw)
    deviation = np.abs(raw - rounded)
    worst = float(deviation.max()) if deviation.size else 0.0
    if worst > LABEL_ROUNDING_TOLERANCE:
        fractional = raw[deviation > LABEL_ROUNDING_TOLERANCE]
        examples = ", ".join(f"{v:.4g}" for v in np.unique(fractional)[:5])
        issues.append(
            RULES["label-fractional"].issue(
                path, field, f"{fractional.size} voxels such as {examples}"
            )
        )
        return None
    if worst > 0.0:
        issues.append(
            RULES["label-near-integer"].issue(
                path, field, f"{raw.dtype} values up to {worst:.2g} from an integer"
            )
        )
    return rounded.astype(np.int32)


# --------------------------------------------------------------------------- labels


def check_label_values(
    volume: Volume,
    label_map: Mapping[int, tuple[int, ...]] | None,
    num_classes: int,
    issues: list[Issue],
) -> bool:
    """Check that the label values can become task classes ``0..num_classes-1``.

    Without a label map the values must already be task classes. With one, any
    value is allowed (unlisted values become background), but a file with negative
    values or more than ``LABEL_MAX_DISTINCT_VALUES`` distinct values is an image
    saved as a label and is rejected either way.
    """
    values = np.unique(volume.array)
    low, high = int(values.min()), int(values.max())
    if low < 0 or values.size > LABEL_MAX_DISTINCT_VALUES:
        issues.append(
            RULES["label-values"].issue(
                volume.path,
                volume.role,
                f"{values.size} distinct values from {low} to {high}",
                "this looks like an image, not a mask",
            )
        )
        return False
    if label_map is not None:
        return True
    outside = values[(values < 0) | (values >= num_classes)]
    if outside.size:
        listed = ", ".join(str(int(v)) for v in outside[:10])
        more = f" and {outside.size - 10} more" if outside.size > 10 else ""
        issues.append(
            RULES["label-values"].issue(
                volume.path,
                volume.role,
                f"{listed}{more}",
                f"the task has classes 0..{num_classes - 1}",
            )
        )
        return False
    return True


def apply_label_map(
    labels: np.ndarray, label_map: Mapping[int, tuple[int, ...]] | None
) -> np.ndarray:
    """Map source label values to task classes; unlisted values become background 0.

    Parameters
    ----------
    labels : np.ndarray
        Integer labels of any shape.
    label_map : Mapping[int, tuple[int, ...]] or None
        Task class -> source values; None returns ``labels`` unchanged.

    Returns
    -------
    np.ndarray
        ``labels.shape``; int16 with a label map (task classes are small), else the
        dtype of ``labels``.
    """
    if label_map is None:
        return labels
    mapped = np.zeros(labels.shape, dtype=np.int16)
    for task_class, source_values in label_map.items():
        mapped[np.isin(labels, source_values)] = task_class
    return mapped


# --------------------------------------------------------------------------- pairing


def _world_bounds(shape: tuple[int, ...], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned world box (min, max) in mm covering every voxel of a grid."""
    corners = np.array(
        [
            [i, j, k]
            for i in (-0.5, shape[0] - 0.5)
            for j in (-0.5, shape[1] - 0.5)
            for k in (-0.5, shape[2] - 0.5)
        ]
    )
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    return world.min(axis=0), world.max(axis=0)


def resample_to_grid(
    array: np.ndarray,
    affine: np.ndarray,
    reference_shape: tuple[int, int, int],
    reference_affine: np.ndarray,
    order: int,
) -> np.ndarray:
    """Resample a volume onto another grid through both affines.

    Parameters
    ----------
    array : np.ndarray
        ``(X, Y, Z)`` source volume.
    affine : np.ndarray
        ``(4, 4)`` affine of the source.
    reference_shape, reference_affine
        The target grid.
    order : int
        0 (nearest, for labels) or 1 (linear, for images). Points outside the source
        become 0.

    Returns
    -------
    np.ndarray
        ``reference_shape``, the dtype of ``array``.
    """
    # Reference voxel index -> world -> source voxel index.
    index_map = np.linalg.inv(affine) @ reference_affine
    return ndimage.affine_transform(
        array,
        index_map[:3, :3],
        offset=index_map[:3, 3],
        output_shape=reference_shape,
        order=order,
        mode="constant",
        cval=0.0,
        prefilter=False,
    )


def _pad_or_crop(array: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Pad with zeros or crop at the high end of each axis to ``shape`` (same origin)."""
    result = np.zeros(shape, dtype=array.dtype)
    common = tuple(slice(0, min(a, b)) for a, b in zip(array.shape, shape, strict=True))
    result[common] = array[common]
    return result


def pair_onto_reference(
    reference: Volume, moving: Volume, order: int, issues: list[Issue]
) -> np.ndarray | None:
    """Put ``moving`` on the grid of ``reference``, pairing them by physical space.

    Equal grids pass unchanged. Equal affines whose shapes differ by one voxel on
    some axis are padded or cropped (warning). Any other difference in shape, spacing,
    orientation or origin is resampled by affine (fixed). Grids that do not overlap
    in world space are an error.

    Parameters
    ----------
    reference, moving : Volume
        ``moving.array`` is ``(X', Y', Z')`` on its own grid.
    order : int
        0 (nearest) for labels, 1 (linear) for images.
    issues : list[Issue]
        Receives the issue, if any.

    Returns
    -------
    np.ndarray or None
        ``reference.array.shape``, dtype of ``moving.array``; None when they do not overlap.
    """
    shape = reference.array.shape
    same_affine = np.allclose(reference.affine, moving.affine, atol=AFFINE_TOLERANCE_MM)
    if same_affine and moving.array.shape == shape:
        return moving.array

    field = f"{moving.role} on {reference.role} grid"
    moving_grid = describe_grid(moving.array.shape, moving.affine)
    reference_grid = describe_grid(shape, reference.affine)

    low_ref, high_ref = _world_bounds(shape, reference.affine)
    low_mov, high_mov = _world_bounds(moving.array.shape, moving.affine)
    overlap = np.minimum(high_ref, high_mov) - np.maximum(low_ref, low_mov)
    if np.any(overlap <= 0.0):
        issues.append(
            RULES["no-overlap"].issue(
                moving.path,
                field,
                moving_grid,
                f"reference {reference.path.name}: {reference_grid}",
            )
        )
        return None

    off_by = np.abs(np.subtract(moving.array.shape, shape))
    if same_affine and int(off_by.max()) == 1:
        issues.append(
            RULES["shape-off-by-one"].issue(
                moving.path, field, moving_grid, f"reference shape {shape}"
            )
        )
        return _pad_or_crop(moving.array, shape)

    issues.append(
        RULES["grid-mismatch"].issue(
            moving.path,
            field,
            moving_grid,
            f"reference {reference.path.name}: {reference_grid}; "
            f"{'nearest-neighbour' if order == 0 else 'linear'} interpolation",
        )
    )
    return resample_to_grid(moving.array, moving.affine, shape, reference.affine, order)


# --------------------------------------------------------------------------- cases


def load_case_volumes(
    images: Mapping[str, Path],
    label: Path | None,
    modality: str,
    label_map: Mapping[int, tuple[int, ...]] | None,
    num_classes: int,
) -> LoadedCase:
    """Decode, check and pair the files of one case on the reference grid.

    The reference grid is the first channel's (the CT for PET/CT). The PET of a
    PET/CT case is resampled onto it linearly and the label by nearest neighbour,
    both by affine, never by array index. The label map is applied last.

    Parameters
    ----------
    images : Mapping[str, Path]
        Image role (``ct``, ``pet``) -> file; must hold ``MODALITY_CHANNELS[modality]``.
    label : Path or None
        The mask, for segmentation.
    modality : str
        ``ct``, ``pet`` or ``petct``.
    label_map : Mapping[int, tuple[int, ...]] or None
        Task class -> source values.
    num_classes : int
        Number of task classes, background included.

    Returns
    -------
    LoadedCase
        ``image`` ``(C, X, Y, Z)`` float32, ``label`` ``(X, Y, Z)`` integers or None, and
        all issues. When any error fired, ``image`` and ``label`` are None.
    """
    result = LoadedCase()
    issues = result.issues
    volumes: list[Volume] = []
    for role in MODALITY_CHANNELS[modality]:
        volume = decode_volume(images[role], role, issues)
        if volume is not None:
            volumes.append(volume)
    label_volume = decode_volume(label, "label", issues) if label is not None else None
    if label_volume is not None:
        check_label_values(label_volume, label_map, num_classes, issues)
    if not result.ok or not volumes:
        return result

    reference = volumes[0]
    channels = [reference.array]
    for volume in volumes[1:]:
        paired = pair_onto_reference(reference, volume, order=1, issues=issues)
        if paired is not None:
            channels.append(paired.astype(np.float32, copy=False))
    paired_label = None
    if label_volume is not None:
        paired_label = pair_onto_reference(reference, label_volume, order=0, issues=issues)
    if not result.ok:
        return result

    result.image = np.stack(channels, axis=0).astype(np.float32, copy=False)
    result.affine = reference.affine
    if paired_label is not None:
        result.label = apply_label_map(paired_label, label_map)
    return result


def describe_issues(issues: list[Issue], limit: int = 3) -> str:
    """Join the first errors of a list of issues into one message."""
    errors = [issue for issue in issues if issue.severity is Severity.ERROR]
    lines = [f"{issue.file}: {issue.to_text()}" for issue in errors[:limit]]
    if len(errors) > limit:
        lines.append(f"... and {len(errors) - limit} more errors")
    return "\n".join(lines)
