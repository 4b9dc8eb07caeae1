"""The phantom cohort (data_prep/phantoms/): determinism, valid DICOM, RTSTRUCT/SEG/NIfTI/NRRD
consistency with the true mask, anatomy HU ranges and tumor sizes. Small in-plane sizes keep it fast."""
import glob
import os

import numpy as np
import pydicom
import pytest
from matplotlib.path import Path
from scipy import ndimage

from data_prep import phantoms as P
from data_prep.contours import fill_polygons

SIZE = 128           # the field of view of a 512 scan, 4x coarser pixels
SLICES = 40


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """One patient of each kind, written once: {kind: (patient dict, folder)}."""
    root = tmp_path_factory.mktemp("phantoms")
    out = {}
    for i, kind in enumerate(P.KINDS):
        p = P.make_patient(0, i, kind=kind, n_slices=SLICES, size=SIZE)
        folder = str(root / kind)
        P.write_patient(folder, p)
        out[kind] = (p, folder)
    return out


def _dicoms(folder):
    files = [f for f in glob.glob(os.path.join(folder, "**", "*"), recursive=True) if os.path.isfile(f)]
    return {f: pydicom.dcmread(f) for f in files}


def _dice(a, b):
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


def _ct(dss):
    return [d for d in dss.values() if d.SOPClassUID == P.CT_IMAGE_STORAGE]


def test_same_bytes_and_uids_per_seed(tmp_path, written):
    p0, folder0 = written["rtstruct"]
    again = P.make_patient(0, 0, kind="rtstruct", n_slices=SLICES, size=SIZE)
    for key in ("hu", "mask", "tissue"):
        np.testing.assert_array_equal(again[key], p0[key])
    files = sorted(P.write_patient(str(tmp_path / "a"), again))
    first = sorted(os.path.relpath(f, folder0) for f in glob.glob(folder0 + "/**/*", recursive=True)
                   if os.path.isfile(f))
    assert files == first
    for rel in files:
        with open(os.path.join(folder0, rel), "rb") as f1, open(str(tmp_path / "a" / rel), "rb") as f2:
            assert f1.read() == f2.read(), rel
    # SEG (highdicom stamps dates and UIDs of its own), NIfTI (gzip time stamps) and NRRD: same bytes too
    for i, kind in enumerate(P.KINDS):
        if kind == "rtstruct":
            continue
        folder = written[kind][1]
        again = P.make_patient(0, i, kind=kind, n_slices=SLICES, size=SIZE)
        for rel in P.write_patient(str(tmp_path / kind), again):
            with open(os.path.join(folder, rel), "rb") as f1, open(str(tmp_path / kind / rel), "rb") as f2:
                assert f1.read() == f2.read(), rel
    # another seed: other anatomy and other UIDs
    other = P.make_patient(1, 0, kind="rtstruct", n_slices=SLICES, size=SIZE)
    assert not np.array_equal(other["hu"], p0["hu"])
    assert P.patient_uids(other)["study"] != P.patient_uids(p0)["study"]


def test_ct_series_is_valid_dicom_with_consistent_geometry(written):
    p, folder = written["rtstruct"]
    cts = _ct(_dicoms(folder))
    assert len(cts) == SLICES
    uids = {d.SOPInstanceUID for d in cts}
    assert len(uids) == SLICES
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert len({getattr(d, key) for d in cts}) == 1
    d0 = cts[0]
    assert d0.file_meta.MediaStorageSOPClassUID == P.CT_IMAGE_STORAGE
    assert (d0.Rows, d0.Columns, d0.BitsAllocated, d0.BitsStored, d0.PixelRepresentation) == \
        (SIZE, SIZE, 16, 16, 1)
    assert float(d0.RescaleIntercept) == -1024 and float(d0.RescaleSlope) == 1
    assert str(d0.PatientName) == "Phantom^000"
    assert [float(v) for v in d0.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    normal = np.cross([1, 0, 0], [0, 1, 0])
    cts.sort(key=lambda d: float(np.dot(normal, [float(v) for v in d.ImagePositionPatient])))
    z = np.array([float(d.ImagePositionPatient[2]) for d in cts])
    gaps = np.diff(z)
    assert np.allclose(gaps, float(d0.SliceThickness)) and 2.5 <= gaps[0] <= 5.0
    assert len({tuple(d.ImagePositionPatient[:2]) for d in cts}) == 1
    np.testing.assert_allclose(z, p["positions"])
    hu = np.stack([d.pixel_array.astype(np.float32) * float(d.RescaleSlope) + float(d.RescaleIntercept)
                   for d in cts])
    np.testing.assert_array_equal(hu, p["hu"])
    # file names say nothing about the order
    names = [os.path.basename(f) for f in glob.glob(folder + "/**/*", recursive=True) if os.path.isfile(f)]
    assert all(len(n.split(".")[0]) == 16 for n in names)
    by_name = sorted(cts, key=lambda d: d.filename)
    assert [d.SOPInstanceUID for d in by_name] != [d.SOPInstanceUID for d in cts]


def _rtstruct(folder):
    dss = _dicoms(folder)
    rts = [d for d in dss.values() if d.SOPClassUID == P.RT_STRUCTURE_SET_STORAGE]
    assert len(rts) == 1
    return rts[0], _ct(dss)


def test_rtstruct_references_the_ct_and_contours_give_back_the_mask(written):
    p, folder = written["rtstruct"]
    rt, cts = _rtstruct(folder)
    by_uid = {d.SOPInstanceUID: d for d in cts}
    ref = rt.ReferencedFrameOfReferenceSequence[0]
    assert ref.FrameOfReferenceUID == cts[0].FrameOfReferenceUID
    study = ref.RTReferencedStudySequence[0]
    assert study.ReferencedSOPInstanceUID == cts[0].StudyInstanceUID
    series = study.RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == cts[0].SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in series.ContourImageSequence} == set(by_uid)
    names = {r.ROINumber: r.ROIName for r in rt.StructureSetROISequence}
    assert P.GTV_NAME in names.values() and 2 <= len(names) <= 3
    gtv = [c for c in rt.ROIContourSequence if names[c.ReferencedROINumber] == P.GTV_NAME][0]
    x0, y0 = float(cts[0].ImagePositionPatient[0]), float(cts[0].ImagePositionPatient[1])
    ps = float(cts[0].PixelSpacing[0])
    z_index = {round(z, 3): k for k, z in enumerate(p["positions"])}
    per_slice = {}
    for item in gtv.ContourSequence:
        assert item.ContourGeometricType == "CLOSED_PLANAR"
        xyz = np.array([float(v) for v in item.ContourData]).reshape(-1, 3)
        assert len(xyz) == item.NumberOfContourPoints and np.ptp(xyz[:, 2]) == 0
        k = z_index[round(xyz[0, 2], 3)]
        # the contour references the CT instance at its own z
        ct = by_uid[item.ContourImageSequence[0].ReferencedSOPInstanceUID]
        assert abs(float(ct.ImagePositionPatient[2]) - xyz[0, 2]) < 1e-3
        per_slice.setdefault(k, []).append(np.c_[(xyz[:, 0] - x0) / ps, (xyz[:, 1] - y0) / ps])
    assert sorted(per_slice) == list(np.nonzero(p["mask"].any(axis=(1, 2)))[0])
    rast = np.zeros_like(p["mask"], dtype=bool)
    rast_mpl = np.zeros_like(rast)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    centres = np.c_[xx.ravel(), yy.ravel()]
    for k, polys in per_slice.items():
        rast[k] = fill_polygons(polys, (SIZE, SIZE))
        for poly in polys:                                   # an independent even-odd check
            rast_mpl[k] ^= Path(poly).contains_points(centres).reshape(SIZE, SIZE)
    assert _dice(rast, p["mask"]) >= 0.98
    assert _dice(rast_mpl, p["mask"]) >= 0.98
    np.testing.assert_array_equal(rast_mpl, p["mask"].astype(bool))   # pixel-boundary contours: exact


def test_seg_is_read_by_highdicom_with_shuffled_frames(written):
    import highdicom as hd
    p, folder = written["seg"]
    dss = _dicoms(folder)
    segs = [f for f, d in dss.items() if d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"]
    assert len(segs) == 1
    seg = hd.seg.segread(segs[0])
    assert seg.SegmentationType == "BINARY" and seg.number_of_segments == 1
    assert seg.SegmentSequence[0].SegmentLabel == P.SEG_LABEL
    cts = sorted(_ct(dss), key=lambda d: float(d.ImagePositionPatient[2]))
    tumor_slices = np.nonzero(p["mask"].any(axis=(1, 2)))[0]
    frame_z = [float(f.PlanePositionSequence[0].ImagePositionPatient[2])
               for f in seg.PerFrameFunctionalGroupsSequence]
    np.testing.assert_allclose(sorted(frame_z), p["positions"][tumor_slices])
    if len(frame_z) > 2:
        assert frame_z != sorted(frame_z)
    uids = [cts[k].SOPInstanceUID for k in tumor_slices]
    pix = seg.get_pixels_by_source_instance(uids)
    np.testing.assert_array_equal(pix[..., 0], p["mask"][tumor_slices])


def test_nifti_and_nrrd_pairs_share_the_dicom_geometry(written):
    import nibabel as nib
    import nrrd
    p, folder = written["nifti"]
    img = nib.load(glob.glob(os.path.join(folder, "image.nii*"))[0])
    msk = nib.load(glob.glob(os.path.join(folder, "mask.nii*"))[0])
    np.testing.assert_allclose(img.affine, msk.affine)
    np.testing.assert_allclose(img.affine, np.diag([-1, -1, 1, 1]) @ p["affine"], atol=1e-4)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), p["hu"].transpose(2, 1, 0))
    np.testing.assert_array_equal(np.asanyarray(msk.dataobj), p["mask"].transpose(2, 1, 0))
    p, folder = written["nrrd"]
    data, hdr = nrrd.read(os.path.join(folder, "image.nrrd"))
    mdata, mhdr = nrrd.read(os.path.join(folder, "mask.nrrd"))
    assert hdr["space"] == mhdr["space"] == "left-posterior-superior"
    np.testing.assert_allclose(hdr["space directions"], mhdr["space directions"])
    np.testing.assert_allclose(hdr["space directions"], p["affine"][:3, :3].T)
    np.testing.assert_allclose(hdr["space origin"], p["affine"][:3, 3])
    np.testing.assert_array_equal(data, p["hu"].transpose(2, 1, 0))
    np.testing.assert_array_equal(mdata, p["mask"].transpose(2, 1, 0))


def test_tumor_sizes_places_and_tissue_hu():
    touching, extents = 0, []
    for i in range(8):
        p = P.make_patient(3, i, size=SIZE)
        m = p["mask"].astype(bool)
        dz, ps, _ = p["spacing"]
        assert 40 <= m.shape[0] <= 80 and 2.5 <= dz <= 5.0 and 0.6 <= ps * SIZE / 512 <= 0.9
        assert m.any() and (m & ~p["lung"]).sum() == 0                   # inside a lung
        assert ndimage.label(m)[1] == 1                                   # one tumor
        ks = np.nonzero(m.any(axis=(1, 2)))[0]
        assert len(ks) >= 3                                               # spans several slices
        ext = max(max(np.ptp(np.nonzero(m[k])[0]), np.ptp(np.nonzero(m[k])[1])) + 1 for k in ks) * ps
        extents.append(ext)
        assert 8.0 <= ext <= 62.0, ext
        touching += p["tumor"]["touches_non_lung"]
        interior = ndimage.binary_erosion(p["tissue"] == P.TUMOR, iterations=1)
        if interior.sum() > 20:
            assert 20 <= p["hu"][interior].mean() <= 70
        for label, lo, hi in ((P.LUNG, -900, -780), (P.MUSCLE, 20, 70), (P.BONE, 550, 850),
                              (P.HEART, 20, 60), (P.AIR, -1024, -980)):
            sel = ndimage.binary_erosion(p["tissue"] == label, iterations=2)
            assert lo <= p["hu"][sel].mean() <= hi, (P.TISSUE_NAMES[label], p["hu"][sel].mean())
        assert p["hu"][p["tissue"] == P.LUNG].std() > 20                  # textured lungs
        assert (p["tissue"] == P.VESSEL).any()                            # nodule-like distractors
    assert touching >= 1
    assert max(extents) - min(extents) > 10


def test_tumor_mm_and_trace_boundaries():
    p = P.make_patient(0, 5, size=SIZE, tumor_mm=12)
    m = p["mask"].astype(bool)
    ext = max(max(np.ptp(np.nonzero(m[k])[0]), np.ptp(np.nonzero(m[k])[1])) + 1
              for k in np.nonzero(m.any(axis=(1, 2)))[0]) * p["spacing"][1]
    assert ext <= 12 + 2 * p["spacing"][1]
    rng = np.random.default_rng(0)
    for _ in range(20):                     # random blobs with diagonal contacts and holes
        m = ndimage.binary_opening(rng.random((30, 30)) > 0.45)
        m = ndimage.binary_fill_holes(m, structure=np.ones((3, 3)))
        got = fill_polygons(P.trace_boundaries(m), m.shape)
        np.testing.assert_array_equal(got, m)
        assert all(np.all(np.abs(q - np.round(q)) == 0.5) for q in P.trace_boundaries(m))


def test_cli_writes_cohort_and_truth_then_skips_done(tmp_path):
    out = str(tmp_path / "raw")
    assert P.main(["--out", out, "--n", "3", "--size", "64", "--jobs", "1", "--seed", "2"]) == 0
    assert sorted(os.listdir(out)) == [".truth", "PHANTOM_000", "PHANTOM_001", "PHANTOM_002"]
    assert P.kind_for_index(2) == "nrrd"
    assert sorted(os.listdir(os.path.join(out, "PHANTOM_002"))) == ["image.nrrd", "mask.nrrd"]
    t = P.load_truth(out, 1)
    p = P.make_patient(2, 1, size=64)
    np.testing.assert_array_equal(t["mask"], p["mask"])
    np.testing.assert_allclose(t["positions"], p["positions"])
    assert str(t["hu_sha256"]) == P.hu_digest(p["hu"])
    stamp = os.path.getmtime(P.truth_path(out, 1))
    P.write_cohort(out, 3, 2, jobs=1, size=64, progress=False)
    assert os.path.getmtime(P.truth_path(out, 1)) == stamp                # done patients are skipped
    # nothing in the patient folders names the patient's input folder
    for f in glob.glob(os.path.join(out, "PHANTOM_0*", "**", "*"), recursive=True):
        assert "PHANTOM_0" not in os.path.basename(f)


def test_one_kind_for_every_patient_same_anatomy(tmp_path):
    out = str(tmp_path / "raw")
    mixed = str(tmp_path / "mixed")
    P.write_cohort(mixed, 3, 2, jobs=1, size=64, progress=False)
    assert P.main(["--out", out, "--n", "3", "--size", "64", "--jobs", "1", "--seed", "2", "--kind", "rtstruct"]) == 0
    # PHANTOM_002 is NRRD in the mix; here it is DICOM CT + RTSTRUCT, with the same mask
    files = glob.glob(os.path.join(out, "PHANTOM_002", "**", "*"), recursive=True)
    assert files and not [f for f in files if f.endswith((".nrrd", ".nii", ".nii.gz"))]
    np.testing.assert_array_equal(P.load_truth(out, 2)["mask"], P.load_truth(mixed, 2)["mask"])
    assert str(P.load_truth(out, 2)["kind"]) == "rtstruct"
    # the mix's patients are not taken for done ones of another kind
    P.write_cohort(mixed, 3, 2, jobs=1, size=64, progress=False, kind="rtstruct")
    assert not glob.glob(os.path.join(mixed, "PHANTOM_002", "*.nrrd"))
