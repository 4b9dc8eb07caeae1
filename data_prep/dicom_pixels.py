"""DICOM pixels: decode a checked CT series into Hounsfield units (`read_hu`), safely.

What it owns
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

"""
import os
from typing import Dict, List

import numpy as np
import pydicom
from pydicom.uid import UID

from data_prep.dicom_files import EXPLICIT_LE, IMPLICIT_LE, quiet
from data_prep.errors import BadInput

MAX_MATRIX = 4096         # Rows/Columns beyond any CT (ultra-high-resolution CT is 2048)


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
