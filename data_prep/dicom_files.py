"""DICOM folders: find the DICOM files of a patient folder and classify them by what they carry.

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
"""
import os
import re
import warnings
from dataclasses import dataclass
from typing import Optional

import pydicom

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


def as_text(value):
    return str(value if value is not None else "").strip()


def sop_class(ds):
    """The SOP class the file carries: SOPClassUID, else (blank or absent) the file meta's."""
    sop = as_text(ds.get("SOPClassUID"))
    if not sop:
        meta = getattr(ds, "file_meta", None)
        sop = as_text(meta.get("MediaStorageSOPClassUID")) if meta is not None else ""
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
    modality = as_text(ds.get("Modality")).upper()
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
            meta is not None and as_text(meta.get("TransferSyntaxUID")) == DEFLATED):
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
    if meta is not None and as_text(meta.get("MediaStorageSOPClassUID")) == DICOMDIR:
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


def find_in_groups(groups, seq_name, attr):
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
