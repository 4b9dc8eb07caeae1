"""DICOM CT series: choose the patient's CT series among the DICOM files and check its geometry.

Finding and classifying the files is data_prep/dicom_files.py; decoding the pixels into HU,
data_prep/dicom_pixels.py; `read_ct_series` does the three in order.

What it owns
- Series choice: CT slices are grouped by SeriesInstanceUID. When a segmentation references CT
  series that are present, only those are candidates. Among the candidates, the axial series with
  the most slices wins; if every candidate is coronal, sagittal or oblique by more than
  AXIAL_MAX_TILT_DEG (gantry-tilted axial series, e.g. head CT at 22 deg, are axial) it is refused.
- Geometry: slices are sorted by ImagePositionPatient . normal (normal = row cosine x column
  cosine), never by file name or InstanceNumber. The series must be consistent (one size,
  orientation and pixel spacing; no two slices at one position) and regular (no step between
  neighbouring slices deviating more than GAP_TOLERANCE from the median step: a missing slice).
  affine = [row_cosine*dx, col_cosine*dy, (P_last-P_first)/(n-1), P_first].

Why non-axial series are refused, not resampled: the net was trained on axial slices, and the
toolkit writes its tumor masks back onto the source slices (DICOM-SEG referencing each SOP
instance). Resampling would break that one-to-one slice mapping and interpolate the radiologist's
mask; a clear refusal lets the user reformat the series with the tool of their choice.
"""
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from data_prep.dicom_files import DicomFile, as_text, find_in_groups
from data_prep.dicom_pixels import MAX_MATRIX, read_hu
from data_prep.errors import BadInput

AXIAL_MAX_TILT_DEG = 30.0  # slice normal within 30 deg of the body axis: axial (gantry-tilted axial is fine)
AXIAL_MIN_COS = float(np.cos(np.radians(AXIAL_MAX_TILT_DEG)))
GAP_TOLERANCE = 0.2       # a slice step deviating > 20% from the median step: missing slice
SAME_TOLERANCE = 1e-3     # orientation cosines / relative pixel spacing that count as "the same"


@dataclass
class Slice:
    """One CT slice: a classic CT file, or one frame of an enhanced CT file."""
    file: DicomFile
    frame: Optional[int]      # None: single-frame file
    position: np.ndarray      # ImagePositionPatient (3,)
    orientation: np.ndarray   # ImageOrientationPatient (6,)
    pixel_spacing: np.ndarray  # (row spacing dy, column spacing dx)
    rows: int
    cols: int
    slope: float
    intercept: float
    uid: str
    series_uid: str
    normal: np.ndarray = field(default=None)


@dataclass
class Series:
    """A sorted, checked CT series, ready to decode."""
    uid: str
    slices: List[Slice]
    affine: np.ndarray
    spacing: tuple            # (dz, dy, dx)
    depths: np.ndarray        # position . normal of each sorted slice


def _floats(value, n, what, patient, rel):
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except Exception:
        raise BadInput(patient, rel, "invalid %s %r" % (what, value))
    if out.shape != (n,) or not np.all(np.isfinite(out)):
        raise BadInput(patient, rel, "invalid %s %r" % (what, value))
    return out


def _rescale(groups, ds, patient, rel, what):
    """(slope, intercept) of a CT frame or image: from the functional groups, else the top level.
    No RescaleIntercept: refused (stored values could be HU or HU + 1024); no slope: 1."""
    def value(key):
        v = find_in_groups(groups, "PixelValueTransformationSequence", key)
        v = ds.get(key) if v is None or as_text(v) == "" else v
        if v is None or as_text(v) == "":
            return None
        try:
            out = float(v)
        except (TypeError, ValueError):
            raise BadInput(patient, rel, "invalid %s %r" % (key, v))
        if not np.isfinite(out) or (key == "RescaleSlope" and out == 0):
            raise BadInput(patient, rel, "invalid %s %r" % (key, v))
        return out
    intercept = value("RescaleIntercept")
    if intercept is None:
        raise BadInput(patient, rel, "CT %s without RescaleIntercept/RescaleSlope: its stored values cannot "
                       "be turned into Hounsfield units (they could be HU or HU + 1024); add the rescale "
                       "tags or convert the series to NIfTI in HU" % what)
    slope = value("RescaleSlope")
    return (1.0 if slope is None else slope), intercept


def ct_slices(f, patient):
    """The slices of one CT file: one for a classic CT image, one per frame for enhanced CT."""
    ds, rel = f.header, f.rel
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows <= 0 or cols <= 0:
        raise BadInput(patient, rel, "CT image without Rows/Columns (damaged or truncated header?)")
    if rows > MAX_MATRIX or cols > MAX_MATRIX:
        raise BadInput(patient, rel, "declared image size Rows %d x Columns %d is beyond any CT (at most %d): "
                       "damaged header" % (rows, cols, MAX_MATRIX))
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise BadInput(patient, rel, "CT image with %s samples per pixel" % ds.get("SamplesPerPixel"))
    series_uid = str(ds.get("SeriesInstanceUID", ""))
    sop = str(ds.get("SOPInstanceUID", ""))
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        shared = ds.get("SharedFunctionalGroupsSequence")
        shared = shared[0] if shared else None
        per = ds.get("PerFrameFunctionalGroupsSequence") or []
        n = int(ds.get("NumberOfFrames", len(per)) or len(per))
        if len(per) != n:
            raise BadInput(patient, rel, "enhanced CT with %d frames but %d per-frame groups" % (n, len(per)))
        out = []
        for i in range(n):
            groups = (per[i], shared)
            pos = find_in_groups(groups, "PlanePositionSequence", "ImagePositionPatient")
            iop = find_in_groups(groups, "PlaneOrientationSequence", "ImageOrientationPatient")
            ps = find_in_groups(groups, "PixelMeasuresSequence", "PixelSpacing")
            if pos is None or iop is None or ps is None:
                raise BadInput(patient, rel, "enhanced CT frame %d lacks plane position, orientation "
                               "or pixel spacing" % (i + 1))
            slope, icpt = _rescale(groups, ds, patient, rel, "frame %d" % (i + 1))
            out.append(Slice(file=f, frame=i, position=_floats(pos, 3, "ImagePositionPatient", patient, rel),
                             orientation=_floats(iop, 6, "ImageOrientationPatient", patient, rel),
                             pixel_spacing=_floats(ps, 2, "PixelSpacing", patient, rel),
                             rows=rows, cols=cols,
                             slope=slope, intercept=icpt,
                             uid=sop, series_uid=series_uid))
        return out
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if ds.get(tag) is None:
            raise BadInput(patient, rel, "CT image without %s (damaged or truncated header?)" % tag)
    slope, intercept = _rescale((), ds, patient, rel, "image")
    return [Slice(file=f, frame=None,
                  position=_floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", patient, rel),
                  orientation=_floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", patient, rel),
                  pixel_spacing=_floats(ds.PixelSpacing, 2, "PixelSpacing", patient, rel),
                  rows=rows, cols=cols,
                  slope=slope, intercept=intercept,
                  uid=sop, series_uid=series_uid)]


def _normal(iop):
    n = np.cross(iop[:3], iop[3:])
    norm = np.linalg.norm(n)
    return n / norm if norm > 0 else n


def is_axial(iop):
    return abs(_normal(np.asarray(iop, dtype=np.float64))[2]) >= AXIAL_MIN_COS


def group_series(files, patient):
    """CT slices grouped by SeriesInstanceUID (dict uid -> list of Slice)."""
    series = {}
    for f in files:
        if f.kind == "ct":
            for s in ct_slices(f, patient):
                series.setdefault(s.series_uid, []).append(s)
    return series


def choose_series(series, patient, referenced=()):
    """The axial CT series with most slices (restricted to `referenced` series UIDs when any exist)."""
    if not series:
        raise BadInput(patient, ".", "no CT image series in the folder")
    uids = sorted(series)
    preferred = [u for u in uids if u in set(referenced)]
    candidates = preferred or uids
    axial = [u for u in candidates if is_axial(series[u][0].orientation)]
    if not axial:
        u = max(candidates, key=lambda k: len(series[k]))
        s = series[u][0]
        raise BadInput(patient, s.file.rel, "non-axial CT series (ImageOrientationPatient %s, slice normal %s); "
                       "the toolkit refuses non-axial series rather than resampling them: reformat "
                       "it to axial slices first" % (_fmt(s.orientation), _fmt(_normal(s.orientation))))
    return max(axial, key=lambda k: (len(series[k]), k))


def _fmt(v):
    return "[" + ", ".join("%.4g" % x for x in v) + "]"


def check_series(uid, slices, patient):
    """Sort the slices along the normal, check them, and compute the geometry."""
    ref = slices[0]
    for s in slices[1:]:
        if (s.rows, s.cols) != (ref.rows, ref.cols):
            raise BadInput(patient, s.file.rel, "mixed series: slice size %dx%d differs from %dx%d of %s"
                           % (s.rows, s.cols, ref.rows, ref.cols, ref.file.rel))
        if np.max(np.abs(s.orientation - ref.orientation)) > SAME_TOLERANCE:
            raise BadInput(patient, s.file.rel, "mixed series: ImageOrientationPatient %s differs from %s of %s"
                           % (_fmt(s.orientation), _fmt(ref.orientation), ref.file.rel))
        if np.max(np.abs(s.pixel_spacing - ref.pixel_spacing)) > SAME_TOLERANCE * np.max(ref.pixel_spacing):
            raise BadInput(patient, s.file.rel, "mixed series: PixelSpacing %s differs from %s of %s"
                           % (_fmt(s.pixel_spacing), _fmt(ref.pixel_spacing), ref.file.rel))
    if not is_axial(ref.orientation):
        raise BadInput(patient, ref.file.rel, "non-axial CT series (ImageOrientationPatient %s); the toolkit "
                       "refuses non-axial series rather than resampling them" % _fmt(ref.orientation))
    row_cos, col_cos = ref.orientation[:3], ref.orientation[3:]
    normal = _normal(ref.orientation)
    depth = np.array([s.position @ normal for s in slices])
    order = np.argsort(depth, kind="stable")
    slices = [slices[i] for i in order]
    depth = depth[order]
    dy, dx = (float(v) for v in ref.pixel_spacing)
    if len(slices) > 1:
        steps = np.diff(depth)
        tiny = max(1e-3, 1e-3 * float(np.max(np.abs(steps))))
        dup = np.flatnonzero(steps < tiny)
        if dup.size:
            a, b = slices[dup[0]], slices[dup[0] + 1]
            raise BadInput(patient, b.file.rel, "mixed series: two slices at one position (%.2f mm along the "
                           "normal), also %s" % (depth[dup[0]], a.file.rel if a.file is not b.file else
                                                   "frame %d" % (a.frame + 1)))
        med = float(np.median(steps))
        off = np.flatnonzero(np.abs(steps - med) > GAP_TOLERANCE * med)
        if off.size:
            i = off[0]
            raise BadInput(patient, slices[i + 1].file.rel,
                           "missing slice: step of %.3g mm between slices at %.2f and %.2f mm along the normal "
                           "(median step %.3g mm)" % (steps[i], depth[i], depth[i + 1], med))
        dz = med
        slice_vec = (slices[-1].position - slices[0].position) / (len(slices) - 1)
    else:
        dz = float(ref.file.header.get("SliceThickness", 0) or 0) or 1.0
        slice_vec = normal * dz
    affine = np.eye(4)
    affine[:3, 0] = row_cos * dx
    affine[:3, 1] = col_cos * dy
    affine[:3, 2] = slice_vec
    affine[:3, 3] = slices[0].position
    for s in slices:
        s.normal = normal
    return Series(uid=uid, slices=slices, affine=affine, spacing=(float(dz), dy, dx), depths=depth)


def read_ct_series(files, patient, referenced=()):
    """Choose, check and decode the CT series of a folder's DICOM files -> (Series, hu)."""
    series = group_series(files, patient)
    uid = choose_series(series, patient, referenced)
    checked = check_series(uid, series[uid], patient)
    return checked, read_hu(checked, patient)
