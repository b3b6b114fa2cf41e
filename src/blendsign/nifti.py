"""Public head-CT hemorrhage sets distributed as NIfTI volumes with segmentation masks → DICOM + annotations.

PhysioNet's CT-ICH (75 scans, hemorrhage masks) and BHSD ship each scan as a NIfTI volume in HU and each
segmentation as a NIfTI mask of the same grid. :func:`import_nifti` writes every volume as a single-frame CT
series (HU, geometry from the affine) that ``blendsign ingest`` reads like any PACS export, and every mask's
connected components per slice as boxes in the native annotation CSV (:mod:`blendsign.labels`), so the
detection branch trains on real outlines. One consensus reader, named after the data set; a slice with a
component is ``normal_ich`` (these sets have no blend-sign label), one without is ``non_ich``.

Geometry: NIfTI world coordinates are RAS+, DICOM's are LPS+ (x and y negated). A volume ``data[i, j, k]`` becomes
slice ``k`` with pixel ``[row j, column i]``: ImageOrientationPatient is the LPS direction of the affine's
``i`` then ``j`` column, ImagePositionPatient the LPS position of voxel ``(0, 0, k)``, PixelSpacing the lengths
of the ``j`` and ``i`` columns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from blendsign.errors import InputError, UnusableFileError
from blendsign.labels import Annotation, annotations_csv
from blendsign.progress import progress as progress_bar
from blendsign.storage import atomic_path, write_text_atomic

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class NiftiImportResult:
    """What :func:`import_nifti` read and wrote; ``skipped`` names each volume left out, with the reason."""

    scans: int = 0
    slices: int = 0
    boxes: int = 0
    slices_with_blood: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        text = (f"imported {self.scans} scans ({self.slices} slices, {self.slices_with_blood} with hemorrhage, "
                f"{self.boxes} boxes)")
        return text + "".join(f"\n  skipped {name}: {why}" for name, why in self.skipped)


def scan_name(path: Path) -> str:
    """``049.nii.gz`` → ``049``."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _volumes(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise NotADirectoryError(f"NIfTI folder {folder} is not a folder")
    return {scan_name(p): p for p in sorted(folder.iterdir()) if p.is_file() and p.name.endswith(NIFTI_SUFFIXES)}


def slice_geometry(affine: np.ndarray, k: int) -> tuple[list[float], list[float], list[float], float]:
    """DICOM ``ImageOrientationPatient``, ``ImagePositionPatient``, ``PixelSpacing`` and slice thickness (mm)
    of slice ``k`` of a NIfTI volume with ``affine`` (``[4, 4]``, voxel → RAS+ mm)."""
    a = np.asarray(affine, dtype=np.float64)
    col_i, col_j, col_k = (_LPS @ a[:3, n] for n in range(3))
    spacing_i, spacing_j, thickness = (float(np.linalg.norm(c)) for c in (col_i, col_j, col_k))
    if min(spacing_i, spacing_j, thickness) <= 0:
        raise UnusableFileError("degenerate affine (a zero voxel size)")
    orientation = [*(col_i / spacing_i), *(col_j / spacing_j)]
    position = _LPS @ (a[:3, :3] @ np.array([0.0, 0.0, float(k)]) + a[:3, 3])
    # NIfTI holds the affine in float32: 6 decimals keep every digit it has, and DICOM's 16-character DS
    return ([round(float(v), 6) for v in orientation], [round(float(v), 6) for v in position],
            [round(spacing_j, 6), round(spacing_i, 6)], round(thickness, 6))


def mask_boxes(mask: np.ndarray) -> list[tuple[float, float, float, float]]:
    """Boxes ``(x_min, y_min, x_max, y_max)`` (pixels, continuous edges) of the 8-connected components of a
    slice's mask ``[rows, cols]`` (any non-zero value), in scan order."""
    from scipy import ndimage

    labelled, n = ndimage.label(mask != 0, structure=np.ones((3, 3), dtype=bool))
    boxes = []
    for rows, cols in ndimage.find_objects(labelled)[:n]:
        boxes.append((float(cols.start), float(rows.start), float(cols.stop), float(rows.stop)))
    return boxes


def _uid(*parts: str) -> str:
    return str(generate_uid(entropy_srcs=["blendsign-nifti", *parts]))  # the same UIDs on every import


def _write_slice(path: Path, hu: np.ndarray, *, dataset: str, name: str, k: int,
                 geometry: tuple[list[float], list[float], list[float], float]) -> str:
    orientation, position, spacing, thickness = geometry
    sop = _uid(dataset, name, "slice", str(k))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, UID(sop)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = _uid(dataset, name, "study"), _uid(dataset, name, "series")
    ds.Modality, ds.BodyPartExamined = "CT", "HEAD"
    ds.PatientID = f"{dataset}-{name}"  # the public set's own (de-identified) scan name
    ds.StudyDescription = ds.SeriesDescription = f"{dataset} head CT (from NIfTI)"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient, ds.ImagePositionPatient = orientation, position
    ds.PixelSpacing, ds.SliceThickness = spacing, thickness
    ds.InstanceNumber, ds.SeriesNumber = k + 1, 1
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.PixelData = np.ascontiguousarray(hu, dtype="<i2").tobytes()
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return sop


def import_nifti(volumes: str | Path, out_dicom: str | Path, *, masks: str | Path | None = None,
                 annotations_out: str | Path | None = None, dataset: str = "nifti",
                 progress: bool = True) -> NiftiImportResult:
    """Write each NIfTI volume under ``volumes`` as a DICOM series under ``out_dicom/<scan>/`` and the slice labels
    and boxes of its mask (same file name under ``masks``) into the annotation CSV ``annotations_out``. A volume
    whose mask is missing or does not match its grid, or that cannot be read, is skipped and named in the result.
    Idempotent: the same files and UIDs on every run."""
    import nibabel as nib
    from nibabel.spatialimages import SpatialImage

    if (masks is None) != (annotations_out is None):
        raise ValueError("masks and annotations_out go together: the annotations are the masks' boxes")
    found = _volumes(Path(volumes))
    if not found:
        raise InputError(f"no NIfTI volume ({' or '.join(NIFTI_SUFFIXES)}) in {volumes}")
    mask_files = _volumes(Path(masks)) if masks is not None else {}
    result = NiftiImportResult()
    annotations: list[Annotation] = []
    for name, path in progress_bar(found.items(), desc="volumes", unit="scan", enabled=progress):
        try:
            if masks is not None and name not in mask_files:
                raise UnusableFileError(f"no mask named {name} in {masks}")
            image = nib.load(path)
            if not isinstance(image, SpatialImage):  # (a NIfTI file's image is one: affine, shape, data)
                raise UnusableFileError(f"a {type(image).__name__}, not a volume")
            hu = np.rint(np.asarray(image.get_fdata(dtype=np.float32)))
            if hu.ndim != 3:
                raise UnusableFileError(f"a {hu.ndim}-D image, not a volume")
            if hu.min() < -32768 or hu.max() > 32767:
                raise UnusableFileError("values outside int16: not HU")
            mask = None
            if masks is not None:
                m = nib.load(mask_files[name])
                if not isinstance(m, SpatialImage):
                    raise UnusableFileError(f"mask: a {type(m).__name__}, not a volume")
                if m.shape != image.shape or not np.allclose(m.affine, image.affine, atol=1e-3):
                    raise UnusableFileError(f"mask grid {m.shape} does not match the volume's {image.shape}")
                mask = np.asarray(m.dataobj)
            geometry = [slice_geometry(image.affine, k) for k in range(hu.shape[2])]
        except Exception as exc:  # nibabel raises many types on a broken file
            reason = str(exc) if isinstance(exc, UnusableFileError) else f"{type(exc).__name__}: {exc}"
            result.skipped.append((path.name, reason))
            log.warning("skipped %s: %s", path.name, exc)
            continue
        study = _uid(dataset, name, "study")
        for k in range(hu.shape[2]):
            sop = _write_slice(Path(out_dicom) / name / f"{k:04d}.dcm", hu[:, :, k].T.astype(np.int16),
                               dataset=dataset, name=name, k=k, geometry=geometry[k])
            boxes = mask_boxes(mask[:, :, k].T) if mask is not None else []
            if masks is not None:
                row = len(annotations) + 2
                annotations += [Annotation(row, study, sop, dataset, "normal_ich", b) for b in boxes] or [
                    Annotation(row, study, sop, dataset, "non_ich", None)]
            result.boxes += len(boxes)
            result.slices_with_blood += bool(boxes)
        result.scans += 1
        result.slices += hu.shape[2]
    if annotations_out is not None:
        write_text_atomic(annotations_out, annotations_csv(annotations))
    return result
