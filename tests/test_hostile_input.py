"""Real and hostile cohorts: each fault the readers met on real scanner data or a damaged
cohort, rebuilt here on a tiny case and checked for its one clear line (pseudonym, file relative to
the patient folder, no name, no ID, no input path) or, for what is valid, for the right voxels.

The cases are the phantom generator's patients (data_prep.phantoms: DICOM CT + RTSTRUCT / SEG with
frames of reference, NIfTI) and test_readers' tiny series, damaged by the tests themselves.
"""
import os

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from data_prep import dicom_files, phantoms, readers
from data_prep.errors import BadInput
from dicom_writer import DZ, TUMOR, disc, truth_hu, write_ct, write_rtstruct

SIZE, SLICES = 64, 10


def _phantom(tmp_path, kind, name="Doe^Jane"):
    """A small phantom patient written in `kind` format; returns (p, folder, written rel paths)."""
    p = phantoms.make_patient(0, 3, kind=kind, n_slices=SLICES, size=SIZE, tumor_mm=25)
    folder = str(tmp_path / name)
    written = phantoms.write_patient(folder, p, kind)
    return p, folder, written


def _secrets(folder):
    ds = pydicom.dcmread(os.path.join(folder, _files(folder)[0]), stop_before_pixels=True)
    return [str(ds.PatientName), str(ds.PatientID), os.path.basename(folder), folder]


def _files(folder):
    return sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs)


def _seg_file(folder):
    """The RTSTRUCT or SEG file of a phantom patient (relative path)."""
    for rel in _files(folder):
        if pydicom.dcmread(os.path.join(folder, rel), stop_before_pixels=True).Modality in ("RTSTRUCT", "SEG"):
            return rel
    raise AssertionError("no segmentation file")


def _refused(folder, patient="P007", secrets=(), **kw):
    with pytest.raises(BadInput) as e:
        readers.load_patient(folder, patient=patient, **kw)
    text = str(e.value)
    assert text.startswith("patient %s, file " % patient) and "\n" not in text, text
    for s in secrets:
        assert s not in text, (s, text)
    return e.value


def _edit(path, fn):
    ds = pydicom.dcmread(path)
    fn(ds)
    ds.save_as(path)


# --- 1. frame of reference -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["rtstruct", "seg"])
def test_segmentation_from_another_frame_of_reference_is_refused(tmp_path, kind):
    p, folder, _ = _phantom(tmp_path, kind)
    assert readers.load_patient(folder).mask.any()             # the untouched patient reads
    rel = _seg_file(folder)
    other = generate_uid()

    def move(ds):
        if kind == "rtstruct":
            for fr in ds.ReferencedFrameOfReferenceSequence:
                fr.FrameOfReferenceUID = other
            for roi in ds.StructureSetROISequence:
                roi.ReferencedFrameOfReferenceUID = other
        else:
            ds.FrameOfReferenceUID = other
    _edit(os.path.join(folder, rel), move)
    e = _refused(folder, secrets=_secrets(folder))
    assert e.file == rel and "another frame of reference" in e.message


# --- 4. the SOP class from what the file carries ---------------------------------------------------

def test_blank_sop_class_is_read_from_the_file_meta_then_modality(tmp_path):
    folder = tmp_path / "p"
    hu = truth_hu()
    write_ct(str(folder), hu)
    ct = sorted(str(p) for p in folder.rglob("x*"))
    for path in ct:                       # de-identified: SOPClassUID present but empty
        _edit(path, lambda ds: setattr(ds, "SOPClassUID", ""))
    assert pydicom.dcmread(ct[0]).SOPClassUID == ""
    assert np.array_equal(readers.load_scan(str(folder)).hu, hu)
    for path in ct:                       # and the file meta blank too: Modality CT + pixel data decide
        def blank(ds):
            ds.file_meta.MediaStorageSOPClassUID = ""
        _edit(path, blank)
    assert np.array_equal(readers.load_scan(str(folder)).hu, hu)
    for path in ct:                       # a secondary capture of a CT is not a CT image
        def capture(ds):
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        _edit(path, capture)
    with pytest.raises(BadInput) as e:
        readers.load_scan(str(folder), patient="P002")
    assert "no CT image series" in str(e.value)


# --- 5. declared image size against the pixel data ---------------------------------------------------

@pytest.mark.parametrize("rows,cols,words", [(65535, 65535, "beyond any CT"),
                                             (40, 48, "truncated pixel data (960 of 3840 bytes")])
def test_declared_size_that_the_pixel_data_cannot_hold(tmp_path, rows, cols, words):
    folder = tmp_path / "p"
    uids, series = write_ct(str(folder), truth_hu())
    write_rtstruct(str(folder / "rs.dcm"), {"GTV": TUMOR}, uids, series)
    ct = sorted(str(p.relative_to(folder)) for p in folder.rglob("x*"))

    def grow(ds):
        ds.Rows, ds.Columns = rows, cols
    for rel in ct:
        _edit(str(folder / rel), grow)
    e = _refused(str(folder))
    assert e.file in ct and words in e.message


# --- 6. HU that would be wrong without a word ---------------------------------------------------------

def test_ct_without_rescale_is_refused(tmp_path):
    folder = tmp_path / "p"
    hu = truth_hu()
    write_ct(str(folder), hu)
    first = sorted(str(p) for p in folder.rglob("x*"))[0]

    def no_slope(ds):
        del ds.RescaleSlope
    _edit(first, no_slope)                                 # intercept alone: slope 1, same HU
    assert np.array_equal(readers.load_scan(str(folder)).hu, hu)

    def no_rescale(ds):
        del ds.RescaleIntercept
    _edit(first, no_rescale)
    with pytest.raises(BadInput) as e:
        readers.load_scan(str(folder), patient="P003")
    assert "without RescaleIntercept" in str(e.value) and os.path.relpath(first, folder) in str(e.value)


def test_nifti_with_nan_voxels_is_refused(tmp_path):
    import nibabel as nib
    p, folder, _ = _phantom(tmp_path, "nifti", name="Smith^Ann")
    image = [f for f in _files(folder) if f.startswith("image")][0]
    img = nib.load(os.path.join(folder, image))
    data = np.asarray(img.dataobj).astype(np.float32)
    data[:3, :3, 0] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), os.path.join(folder, image))
    e = _refused(folder, secrets=[folder, "Smith"])
    assert e.file == image and "9 NaN or infinite voxel(s)" in e.message


# --- 7. truncated segmentation files ------------------------------------------------------------------

@pytest.mark.parametrize("kind,keep", [("rtstruct", 0.3), ("rtstruct", 0.7), ("rtstruct", 0.99), ("seg", 0.8)])
def test_truncated_segmentation_file_is_called_truncated(tmp_path, kind, keep):
    p, folder, _ = _phantom(tmp_path, kind)
    rel = _seg_file(folder)
    data = open(os.path.join(folder, rel), "rb").read()
    with open(os.path.join(folder, rel), "wb") as f:
        f.write(data[:int(len(data) * keep)])
    e = _refused(folder, secrets=_secrets(folder))
    assert e.file == rel and "truncated" in e.message and "empty mask" not in e.message


def test_whole_real_files_are_not_truncated():
    fixtures = os.path.join(os.path.dirname(__file__), "fixtures", "dicom")
    for name in ("rtstruct.dcm", "eCT_Supplemental.dcm", "693_J2KR.dcm", "CT_small.dcm"):
        path = os.path.join(fixtures, name)
        ds = pydicom.dcmread(path, force=True)
        with open(path, "rb") as f:
            preamble = f.read(132)[128:] == b"DICM"
        assert not dicom_files.file_ends_inside_an_element(path, ds, preamble), name


# --- 8. one placement rule for contours -------------------------------------------------------------

@pytest.mark.parametrize("shift_slices,words", [(0.4, None), (24.0, "off every CT slice"),
                                                (1.0, "references the slice")])
def test_contour_placement_rule(tmp_path, shift_slices, words):
    """A contour referencing slice 4 but lying 0.4 / 24 (60 mm) / 1 slice spacings away from it."""
    folder = tmp_path / "p"
    uids, series = write_ct(str(folder), truth_hu())
    rs = str(folder / "struct" / "rs.dcm")
    write_rtstruct(rs, {"GTV": {4: [disc(10.3, 9.2, 4.1)]}}, uids, series, with_refs=True)
    truth = readers.load_patient(str(folder)).mask
    assert truth[4].any() and truth.sum() == truth[4].sum()

    def shift(ds):
        c = ds.ROIContourSequence[0].ContourSequence[0]
        pts = np.array([float(v) for v in c.ContourData]).reshape(-1, 3)
        pts[:, 2] += shift_slices * DZ
        c.ContourData = ["%.4f" % v for v in pts.ravel()]
    _edit(rs, shift)
    if words is None:
        assert np.array_equal(readers.load_patient(str(folder)).mask, truth)    # on its own slice
    else:
        e = _refused(str(folder))
        assert e.file == "struct/rs.dcm" and words in e.message


# --- 9. no names in messages ---------------------------------------------------------------------------

def test_names_and_ids_never_reach_a_message(tmp_path):
    folder = tmp_path / "Doe^Jane"
    uids, series = write_ct(str(folder), truth_hu())           # PatientName Secret^Name, PatientID SECRET-ID
    sub = folder / "Secret^Name" / "SECRET-ID"                   # sub-folders named after the patient
    write_rtstruct(str(sub / "rs.dcm"), {"GTV SECRET-ID": TUMOR, "Body secret^name": {}}, uids, series)
    secrets = ["SECRET", "Secret", "secret", str(folder)]
    e = _refused(str(folder), secrets=secrets, roi_regex="^liver$")      # the ROI names are listed
    assert e.file == "<patient>/<patient>/rs.dcm" and "'GTV <patient>'" in e.message
    # a file that cannot be read, inside a sub-folder named like the patient folder
    bad = folder / "Doe^Jane" / "broken.dcm"
    bad.parent.mkdir()
    bad.write_bytes(open(sorted(str(p) for p in folder.rglob("x*"))[0], "rb").read()[:300])
    e = _refused(str(folder), secrets=secrets + ["Doe^Jane/"])
    assert e.file == "<patient>/broken.dcm" and "unreadable DICOM" in e.message
