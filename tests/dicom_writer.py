"""A tiny DICOM writer for the reader tests: CT series (24x20 pixels), RTSTRUCT and DICOM-SEG written with
pydicom, so that each test states its truth exactly (tests/test_readers*.py, tests/test_hostile_input.py).

`rt_patient(folder)` writes the standard case: a 9-slice CT series, an RTSTRUCT with "Body" and "GTV-1"
(TUMOR, with a hole on slice 4) and a non-DICOM file beside them.
"""
import os
import random

import numpy as np
from matplotlib.path import Path as MplPath
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT = "1.2.840.10008.5.1.4.1.1.2"
RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
ROWS, COLS, NZ = 20, 24, 9
DZ, DY, DX = 2.5, 0.8, 0.7
ORIGIN = np.array([-10.0, -20.0, -30.0])


def _meta(sop_class, sop_uid):
    m = FileMetaDataset()
    m.MediaStorageSOPClassUID = sop_class
    m.MediaStorageSOPInstanceUID = sop_uid
    m.TransferSyntaxUID = ExplicitVRLittleEndian
    return m


def _save(ds, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.save_as(path, write_like_original=False)


def truth_hu(nz=NZ, rows=ROWS, cols=COLS):
    z, y, x = np.mgrid[:nz, :rows, :cols]
    return (-1000 + 7 * x + 31 * y + 101 * z).astype(np.float32)   # unique per voxel


def positions(nz=NZ, dz=DZ, origin=ORIGIN):
    return [origin + [0, 0, k * dz] for k in range(nz)]


def write_ct(folder, hu, iop=(1, 0, 0, 0, 1, 0), pos=None, spacing=(DY, DX), series_uid=None,
             names=None, shuffle=True):
    """CT Image Storage files (int16, intercept -1024) in nested folders with scrambled names."""
    series_uid = series_uid or generate_uid()
    study, frame = generate_uid(), generate_uid()
    pos = positions(len(hu)) if pos is None else pos
    order = list(range(len(hu)))
    if shuffle:
        random.Random(len(hu)).shuffle(order)
    uids = []
    for n, k in enumerate(order):
        uid = generate_uid()
        ds = Dataset()
        ds.file_meta = _meta(CT, uid)
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CT, uid, "CT"
        ds.PatientName, ds.PatientID = "Secret^Name", "SECRET-ID"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series_uid, frame
        ds.InstanceNumber = n + 1                          # deliberately not the slice order
        ds.ImagePositionPatient = [float(v) for v in pos[k]]
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
        ds.SliceThickness = DZ
        ds.Rows, ds.Columns = hu.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (hu[k] + 1024).astype("<i2").tobytes()
        name = (names[k] if names else "sub%d/x%03d" % (n % 2, (n * 37) % 101))
        _save(ds, os.path.join(folder, name))
        uids.append((k, uid))
    return [u for _, u in sorted(uids)], series_uid


def lps(col, row, k, iop=(1, 0, 0, 0, 1, 0), pos=None):
    pos = positions() if pos is None else pos
    iop = np.asarray(iop, float)
    return pos[k] + col * DX * iop[:3] + row * DY * iop[3:]


def write_rtstruct(path, rois, uids, series_uid, with_refs=True):
    """rois: {name: {slice: [polygon (N,2) in (col,row) pixels]}}"""
    ds = Dataset()
    uid = generate_uid()
    ds.file_meta = _meta(RTSTRUCT, uid)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = RTSTRUCT, uid, "RTSTRUCT"
    se = Dataset(); se.SeriesInstanceUID = series_uid
    st = Dataset(); st.RTReferencedSeriesSequence = Sequence([se])
    fr = Dataset(); fr.RTReferencedStudySequence = Sequence([st])
    ds.ReferencedFrameOfReferenceSequence = Sequence([fr])
    ds.StructureSetROISequence, ds.ROIContourSequence = Sequence(), Sequence()
    for number, (name, slices) in enumerate(rois.items(), start=1):
        r = Dataset(); r.ROINumber, r.ROIName = number, name
        ds.StructureSetROISequence.append(r)
        rc = Dataset(); rc.ReferencedROINumber = number; rc.ContourSequence = Sequence()
        for k, polys in slices.items():
            for poly in polys:
                c = Dataset()
                c.ContourGeometricType = "CLOSED_PLANAR"
                pts = np.array([lps(x, y, k) for x, y in poly])
                c.NumberOfContourPoints = len(pts)
                c.ContourData = ["%.4f" % v for v in pts.ravel()]
                if with_refs:
                    ref = Dataset(); ref.ReferencedSOPClassUID = CT; ref.ReferencedSOPInstanceUID = uids[k]
                    c.ContourImageSequence = Sequence([ref])
                rc.ContourSequence.append(c)
        ds.ROIContourSequence.append(rc)
    _save(ds, path)


def write_seg(path, masks, uids, series_uid, order=None, with_refs=True, with_pos=True,
              fractional=False, labels=None):
    """masks: list of (Z, Y, X) bool, one per segment; frames only for slices with voxels."""
    ds = Dataset()
    uid = generate_uid()
    ds.file_meta = _meta(SEG, uid)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = SEG, uid, "SEG"
    se = Dataset(); se.SeriesInstanceUID = series_uid
    ds.ReferencedSeriesSequence = Sequence([se])
    ds.SegmentSequence = Sequence()
    frames = []
    for s, m in enumerate(masks, start=1):
        item = Dataset(); item.SegmentNumber = s
        item.SegmentLabel = (labels or ["GTV"] * len(masks))[s - 1]
        ds.SegmentSequence.append(item)
        frames += [(s, k, m[k]) for k in range(len(m)) if m[k].any()]
    if order is not None:
        frames = [frames[i] for i in order(len(frames))]
    sh = Dataset()
    po = Dataset(); po.ImageOrientationPatient = [1.0, 0, 0, 0, 1.0, 0]
    pm = Dataset(); pm.PixelSpacing = [DY, DX]; pm.SliceThickness = DZ
    sh.PlaneOrientationSequence, sh.PixelMeasuresSequence = Sequence([po]), Sequence([pm])
    ds.SharedFunctionalGroupsSequence = Sequence([sh])
    ds.PerFrameFunctionalGroupsSequence = Sequence()
    for s, k, _ in frames:
        fg = Dataset()
        si = Dataset(); si.ReferencedSegmentNumber = s
        fg.SegmentIdentificationSequence = Sequence([si])
        if with_pos:
            pp = Dataset(); pp.ImagePositionPatient = [float(v) for v in positions()[k]]
            fg.PlanePositionSequence = Sequence([pp])
        if with_refs:
            src = Dataset(); src.ReferencedSOPClassUID = CT; src.ReferencedSOPInstanceUID = uids[k]
            der = Dataset(); der.SourceImageSequence = Sequence([src])
            fg.DerivationImageSequence = Sequence([der])
        ds.PerFrameFunctionalGroupsSequence.append(fg)
    ds.NumberOfFrames = len(frames)
    ds.Rows, ds.Columns = ROWS, COLS
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    stack = np.array([f for _, _, f in frames], dtype=np.uint8)
    if fractional:
        ds.SegmentationType, ds.MaximumFractionalValue = "FRACTIONAL", 200
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = (stack * 120 + (1 - stack) * 80).astype(np.uint8).tobytes()   # 0.6 / 0.4
    else:
        ds.SegmentationType = "BINARY"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0
        ds.PixelData = np.packbits(stack.ravel(), bitorder="little").tobytes()
    _save(ds, path)


def disc(cx, cy, r, n=48):
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.c_[cx + r * np.cos(a), cy + r * np.sin(a)]


def filled(polys_by_slice, nz=NZ):
    m = np.zeros((nz, ROWS, COLS), dtype=bool)
    yy, xx = np.mgrid[:ROWS, :COLS]
    pts = np.c_[xx.ravel(), yy.ravel()]
    for k, polys in polys_by_slice.items():
        for p in polys:
            m[k] ^= MplPath(p).contains_points(pts).reshape(ROWS, COLS)
    return m


TUMOR = {3: [disc(10.2, 8.3, 4.1)], 4: [disc(11.1, 9.2, 5.3), disc(11.1, 9.2, 2.2)], 5: [disc(12.3, 9.9, 3.2)]}


def rt_patient(folder):
    """The standard case under `folder`: (folder, CT uids, series uid)."""
    uids, series = write_ct(str(folder), truth_hu())
    write_rtstruct(str(folder / "struct" / "rs.dcm"),
                   {"Body": {k: [disc(12, 10, 9.5)] for k in range(NZ)}, "GTV-1": TUMOR}, uids, series)
    (folder / "notes.txt").write_text("not DICOM\n")
    return folder, uids, series
