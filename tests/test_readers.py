"""Readers: DICOM series + RTSTRUCT / DICOM-SEG, NIfTI and NRRD pairs, and every refused input.

The DICOM here is written by the tests themselves with pydicom (tiny series, 24x20 pixels), so each
case states its truth exactly; tests/test_dicom_edge_cases.py covers real files from other writers.
"""
import os
import random
import shutil

import numpy as np
import pydicom
import pytest
from matplotlib.path import Path as MplPath
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from data_prep import readers
from data_prep.contours import fill_polygons
from data_prep.errors import BadInput

CT = "1.2.840.10008.5.1.4.1.1.2"
RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
ROWS, COLS, NZ = 20, 24, 9
DZ, DY, DX = 2.5, 0.8, 0.7
ORIGIN = np.array([-10.0, -20.0, -30.0])


# --- a tiny DICOM writer -------------------------------------------------------------------------

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


@pytest.fixture
def rt_patient(tmp_path):
    folder = tmp_path / "rt"
    uids, series = write_ct(str(folder), truth_hu())
    write_rtstruct(str(folder / "struct" / "rs.dcm"),
                   {"Body": {k: [disc(12, 10, 9.5)] for k in range(NZ)}, "GTV-1": TUMOR}, uids, series)
    (folder / "notes.txt").write_text("not DICOM\n")
    return folder, uids, series


# --- geometry and rasterisation ------------------------------------------------------------------

def test_fill_polygons_is_even_odd_on_pixel_centres():
    rng = np.random.RandomState(1)
    yy, xx = np.mgrid[:30, :33]
    pts = np.c_[xx.ravel(), yy.ravel()]
    for _ in range(60):
        polys = [np.c_[rng.uniform(-4, 36, 7), rng.uniform(-4, 34, 7)] for _ in range(rng.randint(1, 4))]
        ref = np.zeros((30, 33), bool)
        for p in polys:
            ref ^= MplPath(p).contains_points(pts).reshape(30, 33)
        assert np.array_equal(fill_polygons(polys, (30, 33)), ref)
    ring = fill_polygons([disc(15, 15, 10), disc(15, 15, 5)], (30, 33))
    assert not ring[15, 15] and ring[15, 22] and not ring[15, 27]


def test_dicom_series_sorted_by_position_not_name(rt_patient):
    folder, uids, _ = rt_patient
    scan = readers.load_scan(str(folder))
    assert scan.source_kind == "dicom" and scan.mask is None
    assert scan.hu.dtype == np.float32 and np.array_equal(scan.hu, truth_hu())
    assert scan.slice_uids == uids and len(scan.headers) == NZ
    assert all("PixelData" not in h for h in scan.headers)
    assert scan.spacing == pytest.approx((DZ, DY, DX))
    for col, row, k in [(0, 0, 0), (5, 7, 3), (COLS - 1, ROWS - 1, NZ - 1)]:
        assert scan.affine @ [col, row, k, 1] == pytest.approx(np.r_[lps(col, row, k), 1])


def test_rtstruct_rasterised_with_holes_and_roi_regex(rt_patient):
    folder, _, _ = rt_patient
    scan = readers.load_patient(str(folder), patient="P007")
    assert scan.source_kind == "dicom-rtstruct"
    assert scan.mask.dtype == np.uint8 and np.array_equal(scan.mask.astype(bool), filled(TUMOR))
    assert scan.mask[4, 9, 11] == 0 and scan.mask[4, 9, 15] == 1        # hole and ring
    body = readers.load_roi_mask(str(folder / "struct" / "rs.dcm"), scan, roi_regex="body")
    assert body.sum() > 5 * scan.mask.sum()


def test_rtstruct_without_image_references_matches_by_position(rt_patient, tmp_path):
    folder, uids, series = rt_patient
    write_rtstruct(str(folder / "struct" / "rs.dcm"), {"Tumour": TUMOR}, uids, series, with_refs=False)
    assert np.array_equal(readers.load_patient(str(folder)).mask.astype(bool), filled(TUMOR))


def test_roi_choice_single_union_none(rt_patient):
    folder, uids, series = rt_patient
    rs = str(folder / "struct" / "rs.dcm")
    second = {7: [disc(5.3, 5.2, 3)]}
    write_rtstruct(rs, {"GTV-1": TUMOR, "Lung": {2: [disc(12, 10, 8)]}, "gtv-2": second}, uids, series)
    union = readers.load_patient(str(folder)).mask.astype(bool)
    assert np.array_equal(union, filled(TUMOR) | filled(second))
    write_rtstruct(rs, {"whatever": second}, uids, series)       # single ROI: used whatever its name
    assert np.array_equal(readers.load_patient(str(folder)).mask.astype(bool), filled(second))
    write_rtstruct(rs, {"Lung": second, "Heart": TUMOR}, uids, series)
    with pytest.raises(BadInput) as e:
        readers.load_patient(str(folder), patient="P002")
    assert str(e.value).startswith("patient P002, file struct/rs.dcm: no ROI matches")
    assert "'Lung'" in str(e.value) and "'Heart'" in str(e.value)


@pytest.mark.parametrize("refs,pos,frac", [(True, True, False), (True, False, False), (False, True, False),
                                           (True, True, True)])
def test_seg_frames_in_any_order(tmp_path, refs, pos, frac):
    folder = tmp_path / "seg"
    uids, series = write_ct(str(folder), truth_hu())
    truth = filled(TUMOR)
    other = filled({1: [disc(4, 4, 2)], 2: [disc(4, 5, 2)]})
    reverse = lambda n: list(range(n))[::-1]                               # noqa: E731
    write_seg(str(folder / "seg.dcm"), [other, truth], uids, series, order=reverse, with_refs=refs,
              with_pos=pos, fractional=frac, labels=["Lung", "GTV"])
    scan = readers.load_patient(str(folder))
    assert scan.source_kind == "dicom-seg" and np.array_equal(scan.mask.astype(bool), truth)


def test_nifti_and_nrrd_pairs_reoriented_to_dicom_layout(tmp_path):
    import nibabel as nib
    import nrrd
    hu = truth_hu()                                      # (Z, Y, X) in DICOM layout, LPS affine below
    lps_affine = np.eye(4)
    lps_affine[:3, :3] = np.diag([DX, DY, DZ])
    lps_affine[:3, 3] = ORIGIN
    xyz = np.transpose(hu, (2, 1, 0))                    # i=x, j=y, k=z
    mask = np.transpose(filled(TUMOR), (2, 1, 0)).astype(np.uint8)
    # NIfTI as dcm2niix writes it: RAS, rows flipped (j runs anterior)
    flip = np.eye(4); flip[1, 1] = -1; flip[1, 3] = ROWS - 1
    ras = np.diag([-1.0, -1, 1, 1]) @ lps_affine @ flip
    nii = tmp_path / "nii"; nii.mkdir()
    nib.save(nib.Nifti1Image(xyz[:, ::-1].astype(np.int16), ras), str(nii / "image.nii.gz"))
    nib.save(nib.Nifti1Image(mask[:, ::-1], ras), str(nii / "mask.nii.gz"))
    # NRRD in RAS with the slice axis first (k, j, i): a permuted array
    nr = tmp_path / "nrrd"; nr.mkdir()
    perm = np.transpose(xyz, (2, 1, 0))
    ras_dirs = (np.diag([-1.0, -1, 1]) @ lps_affine[:3, :3]).T[[2, 1, 0]]
    ras_origin = [-ORIGIN[0], -ORIGIN[1], ORIGIN[2]]
    hdr = {"space": "right-anterior-superior", "space directions": ras_dirs, "space origin": ras_origin}
    nrrd.write(str(nr / "image.nrrd"), perm.astype(np.int16), hdr)
    nrrd.write(str(nr / "mask.nrrd"), np.transpose(mask, (2, 1, 0)), hdr)
    for folder, kind in ((nii, "nifti"), (nr, "nrrd")):
        scan = readers.load_patient(str(folder))
        assert scan.source_kind == kind
        assert np.array_equal(scan.hu, hu) and np.array_equal(scan.mask.astype(bool), filled(TUMOR))
        assert scan.affine == pytest.approx(lps_affine, abs=1e-4)
        assert scan.spacing == pytest.approx((DZ, DY, DX), abs=1e-5)


def test_volume_mask_onto_dicom_scan_in_any_voxel_order(rt_patient, tmp_path):
    import nibabel as nib
    scan = readers.load_scan(str(rt_patient[0]))
    truth = filled(TUMOR)
    xyz = np.transpose(truth, (2, 1, 0)).astype(np.uint8)
    flip = np.eye(4); flip[1, 1] = -1; flip[1, 3] = ROWS - 1         # rows stored bottom-up, RAS
    ras = np.diag([-1.0, -1, 1, 1]) @ scan.affine @ flip
    nib.save(nib.Nifti1Image(xyz[:, ::-1], ras), str(tmp_path / "m.nii.gz"))
    assert np.array_equal(readers.load_roi_mask(str(tmp_path / "m.nii.gz"), scan).astype(bool), truth)
    shifted = ras.copy(); shifted[:3, 3] += ras[:3, 0] * 0.5                 # half a voxel off
    nib.save(nib.Nifti1Image(xyz[:, ::-1], shifted), str(tmp_path / "m.nii.gz"))
    with pytest.raises(BadInput, match="different grids"):
        readers.load_roi_mask(str(tmp_path / "m.nii.gz"), scan)


@pytest.mark.parametrize("pixrep", [0, 1])
def test_garbage_above_bits_stored_is_dropped(tmp_path, pixrep):
    folder = tmp_path / "bits"
    write_ct(str(folder), truth_hu(2))
    hu = truth_hu(2)
    for q in folder.rglob("x*"):
        ds = pydicom.dcmread(str(q))
        k = int(np.argmin([abs(float(ds.ImagePositionPatient[2]) - p[2]) for p in positions(2)]))
        stored = (hu[k] + 1024).astype(np.int64) if pixrep == 0 else (hu[k] + 24).astype(np.int64)
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, pixrep
        ds.RescaleIntercept = -1024 if pixrep == 0 else -24
        garbage = 0xA000                                             # overlay-like bits 13 and 15
        ds.PixelData = ((stored & 0xFFF) | garbage).astype("<u2").tobytes()
        ds.save_as(str(q))
    assert np.array_equal(readers.load_scan(str(folder)).hu, hu)


# --- bad input: one test each, on tiny corrupted copies ------------------------------------------

def _raises(folder, patient="P009", **kw):
    with pytest.raises(BadInput) as e:
        readers.load_patient(str(folder), patient=patient, **kw)
    text = str(e.value)
    assert text.startswith("patient %s, file " % patient) and "\n" not in text
    assert "Secret" not in text and "SECRET" not in text and str(folder) not in text
    return e.value


def _ct_files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("x*"))


def test_bad_truncated_pixel_file(rt_patient):
    folder, _, _ = rt_patient
    victim = _ct_files(folder)[3]
    data = (folder / victim).read_bytes()
    (folder / victim).write_bytes(data[:-200])
    e = _raises(folder)
    assert e.file == victim and "truncated" in e.message


def test_bad_unreadable_header(rt_patient):
    folder, _, _ = rt_patient
    victim = _ct_files(folder)[0]
    data = (folder / victim).read_bytes()
    (folder / victim).write_bytes(data[:300])           # cut inside the header
    e = _raises(folder)
    assert e.file == victim and "unreadable DICOM" in e.message


def test_bad_no_ct_series(rt_patient):
    folder, _, _ = rt_patient
    for f in _ct_files(folder):
        os.remove(folder / f)
    assert "no CT image series" in _raises(folder).message


def test_bad_no_segmentation(rt_patient):
    folder, _, _ = rt_patient
    shutil.rmtree(folder / "struct")
    assert "no segmentation" in _raises(folder).message


def test_bad_no_matching_roi(rt_patient):
    e = _raises(rt_patient[0], roi_regex="^liver$")
    assert e.file == "struct/rs.dcm" and "'Body'" in e.message and "'GTV-1'" in e.message


def test_bad_empty_mask(rt_patient):
    folder, uids, series = rt_patient
    write_rtstruct(str(folder / "struct" / "rs.dcm"), {"GTV": {4: [np.array([[3.1, 3.1], [3.4, 3.2], [3.2, 3.4]])]},
                                                       "Body": {}}, uids, series)
    e = _raises(folder)
    assert e.file == "struct/rs.dcm" and "empty mask" in e.message


def test_bad_contour_off_the_series(rt_patient):
    folder, uids, series = rt_patient
    write_rtstruct(str(folder / "struct" / "rs.dcm"), {"GTV": {4: [disc(9, 9, 3)]}}, uids, series, with_refs=False)
    ds = pydicom.dcmread(str(folder / "struct" / "rs.dcm"))
    c = ds.ROIContourSequence[0].ContourSequence[0]
    pts = np.array([float(v) for v in c.ContourData]).reshape(-1, 3)
    pts[:, 2] += 50 * DZ
    c.ContourData = ["%.4f" % v for v in pts.ravel()]
    ds.save_as(str(folder / "struct" / "rs.dcm"))
    assert "off every CT slice" in _raises(folder).message


def test_bad_different_grids(tmp_path):
    import nibabel as nib
    folder = tmp_path / "p"; folder.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((8, 9, 5), np.int16), np.diag([0.7, 0.7, 2.5, 1])), str(folder / "image.nii"))
    m = np.zeros((8, 9, 5), np.uint8); m[3, 3, 2] = 1
    nib.save(nib.Nifti1Image(m, np.diag([0.7, 0.7, 2.0, 1])), str(folder / "mask.nii.gz"))
    e = _raises(folder)
    assert e.file == "mask.nii.gz" and "different grids" in e.message
    nib.save(nib.Nifti1Image(m[:, :, :4], np.diag([0.7, 0.7, 2.5, 1])), str(folder / "mask.nii.gz"))
    assert "different grids" in _raises(folder).message
    os.remove(folder / "mask.nii.gz")
    assert "no segmentation" in _raises(folder).message


def test_bad_seg_on_another_grid(tmp_path):
    folder = tmp_path / "seg"
    uids, series = write_ct(str(folder), truth_hu())
    write_seg(str(folder / "seg.dcm"), [filled(TUMOR)], uids, series, with_refs=False)
    ds = pydicom.dcmread(str(folder / "seg.dcm"))
    for fg in ds.PerFrameFunctionalGroupsSequence:
        p = fg.PlanePositionSequence[0]
        p.ImagePositionPatient = [p.ImagePositionPatient[0] + 3 * DX] + list(p.ImagePositionPatient[1:])
    ds.save_as(str(folder / "seg.dcm"))
    e = _raises(folder)
    assert e.file == "seg.dcm" and "different grids" in e.message


def test_bad_missing_slice(tmp_path):
    folder = tmp_path / "gap"
    uids, series = write_ct(str(folder), truth_hu(), shuffle=False, names=["s%d.dcm" % k for k in range(NZ)])
    write_rtstruct(str(folder / "rs.dcm"), {"GTV": TUMOR}, uids, series)
    os.remove(folder / "s6.dcm")
    e = _raises(folder)
    assert e.file == "s7.dcm" and "missing slice" in e.message


def test_bad_mixed_series(tmp_path):
    folder = tmp_path / "mixed"
    uids, series = write_ct(str(folder), truth_hu(), shuffle=False, names=["a%d.dcm" % k for k in range(NZ)])
    write_rtstruct(str(folder / "rs.dcm"), {"GTV": TUMOR}, uids, series)
    # same SeriesInstanceUID, other slice size
    write_ct(str(folder), truth_hu(2, ROWS + 2, COLS), series_uid=series, pos=positions(2, origin=ORIGIN + [0, 0, 100]),
             names=["b0.dcm", "b1.dcm"])
    assert "mixed series" in _raises(folder).message
    for n in ("b0.dcm", "b1.dcm"):
        os.remove(folder / n)
    # same SeriesInstanceUID, a second acquisition at the same positions
    write_ct(str(folder), truth_hu(), series_uid=series, names=["c%d.dcm" % k for k in range(NZ)])
    assert "two slices at one position" in _raises(folder).message


def test_bad_non_axial(tmp_path):
    folder = tmp_path / "sag"
    iop = (0, 1, 0, 0, 0, -1)                                  # sagittal
    pos = [ORIGIN + [k * DZ, 0, 0] for k in range(NZ)]
    uids, series = write_ct(str(folder), truth_hu(), iop=iop, pos=pos)
    write_rtstruct(str(folder / "rs.dcm"), {"GTV": {}}, uids, series)
    e = _raises(folder)
    assert "non-axial" in e.message and "refuses" in e.message


def test_axial_series_with_most_slices_wins(rt_patient):
    folder, uids, series = rt_patient
    shutil.rmtree(folder / "struct")
    write_ct(str(folder / "scout"), truth_hu(NZ + 3), iop=(0, 1, 0, 0, 0, -1),
             pos=[ORIGIN + [k * DZ, 0, 0] for k in range(NZ + 3)])      # more slices, but sagittal
    write_ct(str(folder / "thick"), truth_hu(4), pos=positions(4, dz=5.0))  # axial, fewer slices
    scan = readers.load_scan(str(folder))
    assert scan.slice_uids == uids and np.array_equal(scan.hu, truth_hu())


# --- the phantom cohort (data_prep.phantoms) against its truth -----------------------------------

def _phantom(tmp_path, kind, index=2):
    from data_prep import phantoms
    p = phantoms.make_patient(0, index, kind=kind, n_slices=14, tumor_mm=45, size=96)
    folder = tmp_path / kind
    phantoms.write_patient(str(folder), p)
    return p, folder


def _dice(a, b):
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("kind", ["rtstruct", "seg", "nifti", "nrrd"])
def test_phantom_patients_read_back_their_truth(tmp_path, kind):
    p, folder = _phantom(tmp_path, kind)
    scan = readers.load_patient(str(folder), patient="P001")
    assert scan.source_kind == {"rtstruct": "dicom-rtstruct", "seg": "dicom-seg"}.get(kind, kind)
    assert np.array_equal(scan.hu, p["hu"].astype(np.float32))
    assert p["mask"].sum() > 50 and _dice(scan.mask, p["mask"]) >= 0.98
    assert scan.affine == pytest.approx(p["affine"], abs=1e-4)
    assert scan.spacing == pytest.approx(p["spacing"], abs=1e-5)
    if kind in ("rtstruct", "seg"):
        assert len(scan.slice_uids) == len(scan.headers) == len(p["hu"])
        z = [float(h.ImagePositionPatient[2]) for h in scan.headers]
        assert z == pytest.approx(list(p["positions"]))


@pytest.mark.parametrize("kind", ["rtstruct", "seg"])
def test_phantom_file_names_and_seg_frame_order_do_not_matter(tmp_path, kind):
    p, folder = _phantom(tmp_path, kind)
    flat = tmp_path / "renamed"
    flat.mkdir()
    files = sorted(q for q in folder.rglob("*") if q.is_file())
    rng = random.Random(5)
    for q, n in zip(files, rng.sample(range(10000), len(files))):
        shutil.copy(str(q), str(flat / ("%04d" % n)))                       # flat, names in another order
    if kind == "seg":
        seg = next(q for q in flat.iterdir() if pydicom.dcmread(str(q), stop_before_pixels=True).Modality == "SEG")
        ds = pydicom.dcmread(str(seg))
        frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
        order = list(range(len(frames)))
        rng.shuffle(order)
        ds.PerFrameFunctionalGroupsSequence = Sequence([ds.PerFrameFunctionalGroupsSequence[i] for i in order])
        ds.PixelData = np.packbits(frames[order].ravel(), bitorder="little").tobytes()
        ds.save_as(str(seg))
    scan = readers.load_patient(str(flat))
    assert np.array_equal(scan.mask, p["mask"]) and np.array_equal(scan.hu, p["hu"].astype(np.float32))
