"""Readers: every refused input, one test each on tiny corrupted copies of tests/dicom_writer.py's series:
one BadInput naming the patient (pseudonym) and the file relative to the patient folder.
"""
import os
import shutil

import numpy as np
import pydicom
import pytest

import dicom_writer
from dicom_writer import (COLS, DX, DZ, NZ, ORIGIN, ROWS, TUMOR, disc, filled, positions, truth_hu, write_ct,
                          write_rtstruct, write_seg)
from data_prep import readers
from data_prep.errors import BadInput


@pytest.fixture
def rt_patient(tmp_path):
    return dicom_writer.rt_patient(tmp_path / "rt")


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
