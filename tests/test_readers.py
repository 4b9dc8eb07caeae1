"""Readers: DICOM series + RTSTRUCT / DICOM-SEG, NIfTI and NRRD pairs read back exactly, and the phantom cohort
against its truth. Refused input: tests/test_readers_bad_input.py.

The DICOM here is written by the tests themselves with pydicom (tests/dicom_writer.py: tiny series, 24x20
pixels), so each case states its truth exactly; tests/test_dicom_edge_cases.py covers real files from other
writers.
"""
import random
import shutil

import numpy as np
import pydicom
import pytest
from matplotlib.path import Path as MplPath
from pydicom.sequence import Sequence

import dicom_writer
from dicom_writer import (COLS, DX, DY, DZ, NZ, ORIGIN, ROWS, TUMOR, disc, filled, lps, positions, truth_hu, write_ct,
                          write_rtstruct, write_seg)
from data_prep import readers
from data_prep.contours import fill_polygons
from data_prep.errors import BadInput


@pytest.fixture
def rt_patient(tmp_path):
    return dicom_writer.rt_patient(tmp_path / "rt")


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
