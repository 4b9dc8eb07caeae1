"""DICOM folders: find the DICOM files, classify them, and read one CT series as Hounsfield units.

What it owns
- Discovery: every file under the patient folder, any sub-folder structure, any file name. A file
  is DICOM when it has the "DICM" marker at byte 128, or (no preamble) starts with a group 0002/0008
  tag and parses with pydicom's force mode; anything else is skipped quietly. Headers are read with
  stop_before_pixels, so classifying a folder costs no pixel decoding. A DICOM file that fails to
  parse is an error (BadInput), not a skip.
- Classification by what the file carries: its SOPClassUID; when that is empty or absent (some
  de-identification tools blank it), the file meta's MediaStorageSOPClassUID; when both are empty,
  Modality together with pixel data (CT + pixel data is a CT image). Classes: CT (CT Image Storage
  and Enhanced CT Image Storage, one slice per frame), RTSTRUCT, SEG; anything else ("other", e.g.
  secondary captures, dose reports) is never taken for CT slices. A file without SOPClassUID or
  Modality whose bytes end inside an element is a truncated header (BadInput).
- Truncation of non-image objects: RTSTRUCT and SEG files are walked element by element (lengths
  only, no parsing, file_ends_inside_an_element); pydicom reads a truncated sequence silently as a
  shorter one, which would make a cut RTSTRUCT look like an empty or partial structure set.
- Series choice: CT slices are grouped by SeriesInstanceUID. When a segmentation references CT
  series that are present, only those are candidates. Among the candidates, the axial series with
  the most slices wins; if every candidate is coronal, sagittal or oblique by more than
  AXIAL_MAX_TILT_DEG (gantry-tilted axial series, e.g. head CT at 22 deg, are axial) it is refused.
- Geometry: slices are sorted by ImagePositionPatient . normal (normal = row cosine x column
  cosine), never by file name or InstanceNumber. The series must be consistent (one size,
  orientation and pixel spacing; no two slices at one position) and regular (no step between
  neighbouring slices deviating more than GAP_TOLERANCE from the median step: a missing slice).
  affine = [row_cosine*dx, col_cosine*dy, (P_last-P_first)/(n-1), P_first].
- Pixels: only the chosen series is decoded, through pydicom's handlers (numpy for native
  syntaxes; Pillow/pylibjpeg for JPEG baseline/lossless, JPEG-LS, JPEG 2000, RLE). Before anything
  is allocated or decoded, the declared image is checked against what the file holds: Rows and
  Columns at most MAX_MATRIX (no CT is larger; a damaged header such as 65535 x 65535 would
  otherwise end in a MemoryError), and native pixel data at least Rows x Columns x frames x
  samples x BitsAllocated/8 bytes (else a truncated file). BitsStored garbage above the stored bits
  of native data is masked (unsigned) or sign-extended (signed). HU = stored x RescaleSlope +
  RescaleIntercept per slice (per frame for enhanced CT, from the PixelValueTransformationSequence,
  else the top level), as float32. A CT without RescaleIntercept is refused: the stored values of
  such files are sometimes HU and sometimes HU + 1024 (unsigned storage), and a silent guess would
  shift every voxel by 1024 HU. A missing RescaleSlope with an intercept present is 1.

Why non-axial series are refused, not resampled: the net was trained on axial slices, and the
toolkit writes its tumor masks back onto the source slices (DICOM-SEG referencing each SOP
instance). Resampling would break that one-to-one slice mapping and interpolate the radiologist's
mask; a clear refusal lets the user reformat the series with the tool of their choice.
"""
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import pydicom
from pydicom.uid import UID

from data_prep.errors import BadInput

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_ENHANCED_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2.2"
RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
DICOMDIR = "1.2.840.10008.1.3.10"
PIXEL_DATA_TAG_LE = b"\xe0\x7f\x10\x00"
EXPLICIT_LE, IMPLICIT_LE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
DEFLATED = "1.2.840.10008.1.2.1.99"

AXIAL_MAX_TILT_DEG = 30.0  # slice normal within 30 deg of the body axis: axial (gantry-tilted axial is fine)
AXIAL_MIN_COS = float(np.cos(np.radians(AXIAL_MAX_TILT_DEG)))
GAP_TOLERANCE = 0.2       # a slice step deviating > 20% from the median step: missing slice
SAME_TOLERANCE = 1e-3     # orientation cosines / relative pixel spacing that count as "the same"
MAX_MATRIX = 4096         # Rows/Columns beyond any CT (ultra-high-resolution CT is 2048)
PIXEL_DATA_TAGS = (PIXEL_DATA_TAG_LE, b"\x7f\xe0\x00\x10")     # little / big endian
CT_CLASSES = (CT_IMAGE, ENHANCED_CT_IMAGE, LEGACY_ENHANCED_CT_IMAGE)


@dataclass
class DicomFile:
    """One DICOM file found in a patient folder, with its header (no pixel data)."""
    path: str                 # absolute
    rel: str                  # relative to the patient folder (used in messages)
    header: pydicom.Dataset
    kind: str                 # 'ct' | 'rtstruct' | 'seg' | 'other'
    pixel_offset: Optional[int] = None   # byte offset of the (7FE0,0010) tag, when the header pass saw it


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


class quiet(warnings.catch_warnings):
    """pydicom warns about every odd value (invalid UIs, BitsStored vs J2K precision); the readers
    handle those cases themselves, so the warnings would only be noise in the tools' logs."""

    def __enter__(self):
        out = super().__enter__()
        warnings.simplefilter("ignore")
        return out


def _dicom_marker(path):
    """'dicom' (DICM marker), 'maybe' (preamble-less file starting with a 0002/0008 tag), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return None
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if len(head) >= 8 and head[1] == 0 and head[0] in (0x02, 0x08):
        return "maybe"
    return None


def _text(value):
    return str(value if value is not None else "").strip()


def sop_class(ds):
    """The SOP class the file carries: SOPClassUID, else (blank or absent) the file meta's."""
    sop = _text(ds.get("SOPClassUID"))
    if not sop:
        meta = getattr(ds, "file_meta", None)
        sop = _text(meta.get("MediaStorageSOPClassUID")) if meta is not None else ""
    return sop


def _kind(ds, has_pixels):
    sop = sop_class(ds)
    if sop in CT_CLASSES:
        return "ct"
    if sop == RTSTRUCT:
        return "rtstruct"
    if sop == SEGMENTATION:
        return "seg"
    if sop:
        return "other"  # secondary captures, dose reports, ...: never taken for CT slices
    modality = _text(ds.get("Modality")).upper()
    if modality == "CT" and has_pixels:
        return "ct"
    return {"RTSTRUCT": "rtstruct", "SEG": "seg"}.get(modality, "other")


# --- truncation: walk a file's elements by their lengths -----------------------------------------

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_ITEM_END, _SEQ_END = 0xE00D, 0xE0DD


class _Cut(Exception):
    """The file ends inside an element."""


def _element_header(fp, implicit):
    """(group, element, length) of the next element (item tags included); None at a clean end."""
    head = fp.read(8)
    if not head.strip(b"\0") and len(head) < 8:     # the end, or zero padding after the last element
        return None
    if len(head) < 8:
        raise _Cut
    group, elem = int.from_bytes(head[:2], "little"), int.from_bytes(head[2:4], "little")
    if group == 0xFFFE or (implicit and group != 0x0002):
        return group, elem, int.from_bytes(head[4:8], "little")
    if head[4:6] in _LONG_VRS:
        ext = fp.read(4)
        if len(ext) < 4:
            raise _Cut
        return group, elem, int.from_bytes(ext, "little")
    return group, elem, int.from_bytes(head[6:8], "little")


def _skip(fp, length, size):
    if fp.tell() + length > size:
        raise _Cut
    fp.seek(length, 1)


def _walk(fp, size, implicit, until=None):
    """Skip elements up to the clean end of the file, or up to the delimiter tag `until`."""
    while True:
        h = _element_header(fp, implicit)
        if h is None:
            if until is not None:
                raise _Cut
            return
        group, elem, length = h
        if group == 0xFFFE and elem == until:
            return
        if length != 0xFFFFFFFF:
            _skip(fp, length, size)
            continue
        while True:            # undefined length: items up to the sequence delimiter
            g, e, n = _element_header(fp, implicit) or (None, None, None)
            if g is None:
                raise _Cut
            if (g, e) == (0xFFFE, _SEQ_END):
                break
            if n == 0xFFFFFFFF:
                _walk(fp, size, implicit, until=_ITEM_END)
            else:
                _skip(fp, n, size)


def file_ends_inside_an_element(path, ds, preamble):
    """True when a (little endian) file stops inside an element: a truncated file. Lengths only."""
    meta = getattr(ds, "file_meta", None)
    if not getattr(ds, "is_little_endian", True) or (
            meta is not None and _text(meta.get("TransferSyntaxUID")) == DEFLATED):
        return False                  # big endian (retired) and deflated data sets are not walked
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as fp:
            fp.seek(132 if preamble else 0)
            _walk(fp, size, bool(getattr(ds, "is_implicit_VR", False)))
    except _Cut:
        return True
    return False


def read_header(path, rel, patient):
    """The header of one file (stop_before_pixels), or None when the file is not DICOM."""
    marker = _dicom_marker(path)
    if marker is None:
        return None
    try:
        with quiet(), open(path, "rb") as fp:
            ds = pydicom.dcmread(fp, stop_before_pixels=True, force=(marker == "maybe"))
            for key in ("SOPClassUID", "Modality"):
                if key in ds:
                    ds[key].value  # noqa: B018 - parse the value now
            # pydicom stops with the file at the pixel data tag: remember where, so that native
            # pixel data can be read later without parsing the header a second time
            offset = fp.tell()
            tag = fp.read(4)
            pixel_offset = offset if tag == PIXEL_DATA_TAG_LE else None
            has_pixels = tag in PIXEL_DATA_TAGS
    except Exception as e:  # pydicom raises many types for damaged files
        if marker == "maybe":
            return None
        raise BadInput(patient, rel, "unreadable DICOM (%s: %s)" % (type(e).__name__, e))
    meta = getattr(ds, "file_meta", None)
    if meta is not None and _text(meta.get("MediaStorageSOPClassUID")) == DICOMDIR:
        return None
    if "SOPClassUID" not in ds and "Modality" not in ds:
        if marker == "maybe":
            return None
        if file_ends_inside_an_element(path, ds, marker == "dicom"):
            raise BadInput(patient, rel, "unreadable DICOM: the file ends inside an element (truncated)")
        if not sop_class(ds):
            raise BadInput(patient, rel, "unreadable DICOM: damaged or truncated header (no SOPClassUID "
                           "and no Modality)")
    kind = _kind(ds, has_pixels)
    if kind in ("rtstruct", "seg") and file_ends_inside_an_element(path, ds, marker == "dicom"):
        raise BadInput(patient, rel, "truncated %s: the file ends inside an element, so its contents are "
                       "incomplete" % ("RTSTRUCT" if kind == "rtstruct" else "DICOM-SEG"))
    return DicomFile(path=path, rel=rel, header=ds, kind=kind, pixel_offset=pixel_offset)


IDENTITY_KEYS = ("PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthName",
                 "PatientMotherBirthName")


def identities(headers):
    """The identifying strings of DICOM headers: patient names (whole and each component) and IDs,
    which messages must never carry (data_prep.errors.BadInput.redacted)."""
    out = set()
    for ds in headers:
        for key in IDENTITY_KEYS:
            try:
                value = ds.get(key)
            except Exception:      # an undecodable value: nothing to learn from it
                continue
            values = value if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
            for v in values:
                text = str(v if v is not None else "").strip()
                if not text:
                    continue
                out.add(text)
                out.update(p for p in re.split(r"[\^=,\s]+", text) if p)
    return out


def find_dicom(folder, patient):
    """Every DICOM file under `folder` (sorted by relative path), with headers; non-DICOM skipped.

    A file that cannot be read stops the search -- after every other header is read, so that the
    message can be cleared of the patient's name and ID wherever it sits (a sub-folder named after
    the patient)."""
    found, errors = [], []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            if not os.path.isfile(path):
                continue
            rel = os.path.relpath(path, folder)
            try:
                f = read_header(path, rel, patient)
            except BadInput as e:
                errors.append(e)
                continue
            if f is not None:
                found.append(f)
    if errors:
        raise errors[0].redacted(identities(f.header for f in found))
    return found


# --- CT slices and series ------------------------------------------------------------------------

def _floats(value, n, what, patient, rel):
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except Exception:
        raise BadInput(patient, rel, "invalid %s %r" % (what, value))
    if out.shape != (n,) or not np.all(np.isfinite(out)):
        raise BadInput(patient, rel, "invalid %s %r" % (what, value))
    return out


def _find_in_groups(groups, seq_name, attr):
    """First `attr` found in `seq_name` of the given functional-group items (per-frame first)."""
    for g in groups:
        if g is None:
            continue
        seq = g.get(seq_name)
        if seq:
            item = seq[0]
            if attr in item:
                return item.get(attr)
    return None


def _rescale(groups, ds, patient, rel, what):
    """(slope, intercept) of a CT frame or image: from the functional groups, else the top level.
    No RescaleIntercept: refused (stored values could be HU or HU + 1024); no slope: 1."""
    def value(key):
        v = _find_in_groups(groups, "PixelValueTransformationSequence", key)
        v = ds.get(key) if v is None or _text(v) == "" else v
        if v is None or _text(v) == "":
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
            pos = _find_in_groups(groups, "PlanePositionSequence", "ImagePositionPatient")
            iop = _find_in_groups(groups, "PlaneOrientationSequence", "ImageOrientationPatient")
            ps = _find_in_groups(groups, "PixelMeasuresSequence", "PixelSpacing")
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


# --- pixels --------------------------------------------------------------------------------------

def _fix_stored_bits(arr, ds):
    """Native pixel data: drop garbage above BitsStored (mask if unsigned, sign-extend if signed).

    Only applied when values fall outside the BitsStored range, so well-formed files are untouched.
    Compressed data come from the decoders at the codestream's own precision (pydicom reconciles
    BitsStored against it, e.g. 693_J2K* and J2K_pixelrep_mismatch)."""
    bits = int(ds.get("BitsStored", 0) or 0)
    alloc = arr.dtype.itemsize * 8
    if not 0 < bits < alloc:
        return arr
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        if arr.min() >= lo and arr.max() <= hi:
            return arr
        u = arr.view(np.dtype("u%d" % arr.dtype.itemsize)) & ((1 << bits) - 1)
        return (u.astype(np.int64) - ((u >> (bits - 1)) & 1).astype(np.int64) * (1 << bits)).astype(arr.dtype)
    if arr.max() < (1 << bits):
        return arr
    return arr & arr.dtype.type((1 << bits) - 1)


def declared_bytes(ds):
    """Bytes of native pixel data the header declares: Rows x Columns x frames x samples x bits/8."""
    return (int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * int(ds.get("NumberOfFrames", 1) or 1)
            * int(ds.get("SamplesPerPixel", 1) or 1) * int(ds.get("BitsAllocated", 16) or 16) // 8)


def _size_text(ds, got, expected):
    return ("truncated pixel data (%d of %d bytes for Rows %s x Columns %s x %s frame(s) x %s bits)"
            % (got, expected, ds.get("Rows"), ds.get("Columns"), ds.get("NumberOfFrames", 1) or 1,
               ds.get("BitsAllocated")))


def _native_element(f):
    """(transfer syntax, length, value offset, bytes left in the file) of the pixel data element of a native little-endian file, read at the
    offset the header pass found; None when that is not known (compressed, big endian, no offset)."""
    meta = getattr(f.header, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if f.pixel_offset is None or ts not in (EXPLICIT_LE, IMPLICIT_LE):
        return None
    with open(f.path, "rb") as fp:
        fp.seek(f.pixel_offset + 4)
        if ts == EXPLICIT_LE:
            vr = fp.read(2)
            if vr in (b"OB", b"OW", b"OF", b"OD", b"OL", b"UN", b"OV"):
                fp.read(2)
                length = int.from_bytes(fp.read(4), "little")
            else:
                length = int.from_bytes(fp.read(2), "little")
        else:
            length = int.from_bytes(fp.read(4), "little")
        if length == 0xFFFFFFFF:                   # encapsulated although the syntax is native
            return None
        start = fp.tell()
        available = os.fstat(fp.fileno()).st_size - start
    return ts, length, start, available


def check_pixel_size(f, patient):
    """Refuse, before anything is allocated or decoded, pixel data that cannot hold the declared image."""
    el = _native_element(f)
    if el is None:
        return
    _, length, _, available = el
    expected = declared_bytes(f.header)
    if min(length, available) < expected:
        raise BadInput(patient, f.rel, _size_text(f.header, min(length, available), expected))


def _native_pixels(f, patient):
    """Native little-endian pixel data read straight from the file at the offset the header pass
    found (what pydicom's numpy handler does, minus a second header parse), or None to fall back."""
    ds = f.header
    bits, pixrep = int(ds.get("BitsAllocated", 0) or 0), int(ds.get("PixelRepresentation", 0) or 0)
    if bits not in (8, 16, 32):
        return None
    el = _native_element(f)
    if el is None:
        return None
    _, length, start, available = el
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    expected = rows * cols * frames * bits // 8
    if min(length, available) < expected:
        raise BadInput(patient, f.rel, _size_text(ds, min(length, available), expected))
    with open(f.path, "rb") as fp:
        fp.seek(start)
        data = fp.read(expected)
    if len(data) < expected:
        raise BadInput(patient, f.rel, _size_text(ds, len(data), expected))
    dtype = np.dtype("<%s%d" % ("i" if pixrep == 1 else "u", bits // 8))
    arr = np.frombuffer(data, dtype=dtype).reshape(frames, rows, cols)
    return _fix_stored_bits(arr, ds)


def read_pixels(f, patient):
    """Decoded stored values of one file, (frames, rows, cols)."""
    fast = _native_pixels(f, patient)
    if fast is not None:
        return fast
    with quiet():
        try:
            ds = pydicom.dcmread(f.path, force=True)
        except Exception as e:
            raise BadInput(patient, f.rel, "unreadable DICOM (%s: %s)" % (type(e).__name__, e))
        if "PixelData" not in ds:
            raise BadInput(patient, f.rel, "no pixel data (truncated file?)")
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        native = ts is None or not UID(ts).is_compressed
        if native:
            expected = declared_bytes(ds)
            got = len(ds.PixelData)
            if got < expected:
                raise BadInput(patient, f.rel, _size_text(ds, got, expected))
        try:
            arr = ds.pixel_array
        except Exception as e:
            raise BadInput(patient, f.rel, "cannot decode pixel data (%s; %s: %s)"
                           % (UID(ts).name if ts else "?", type(e).__name__, e))
    arr = np.asarray(arr).reshape(frames, rows, cols)
    if native:
        arr = _fix_stored_bits(arr, ds)
    return arr


def read_hu(series, patient):
    """(Z, Y, X) float32 Hounsfield units of a checked series."""
    s0 = series.slices[0]
    for f in {id(s.file): s.file for s in series.slices}.values():
        check_pixel_size(f, patient)
    hu = np.empty((len(series.slices), s0.rows, s0.cols), dtype=np.float32)
    by_file: Dict[str, List[int]] = {}
    for z, s in enumerate(series.slices):
        by_file.setdefault(s.file.path, []).append(z)
    for path, zs in by_file.items():
        f = series.slices[zs[0]].file
        arr = read_pixels(f, patient)
        for z in zs:
            s = series.slices[z]
            frame = arr[s.frame if s.frame is not None else 0]
            if s.slope == 1.0:
                np.add(frame, np.float32(s.intercept), out=hu[z], casting="unsafe")
            else:
                hu[z] = frame.astype(np.float32) * np.float32(s.slope) + np.float32(s.intercept)
    return hu


def read_ct_series(files, patient, referenced=()):
    """Choose, check and decode the CT series of a folder's DICOM files -> (Series, hu)."""
    series = group_series(files, patient)
    uid = choose_series(series, patient, referenced)
    checked = check_series(uid, series[uid], patient)
    return checked, read_hu(checked, patient)
