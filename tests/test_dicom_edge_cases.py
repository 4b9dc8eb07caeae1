"""Real DICOM files from pydicom's test corpus (tests/fixtures/dicom, MIT, see PROVENANCE.md there):
compressed transfer syntaxes, BitsStored/PixelRepresentation quirks, enhanced multi-frame CT, an
RTSTRUCT without preamble, and truncated copies that must be refused naming the file.

The expected HU ranges are the ones PROVENANCE.md measured independently (pydicom 3 + pylibjpeg).
"""
import os
import shutil

import numpy as np
import pydicom
import pytest

from data_prep import readers
from data_prep.errors import BadInput
from data_prep.scan import Scan

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "dicom")


def scan_of(tmp_path, name, rename="IMG0001"):
    folder = tmp_path / name.replace(".dcm", "")
    folder.mkdir()
    shutil.copy(os.path.join(FIXTURES, name), str(folder / rename))      # any file name
    return readers.load_scan(str(folder), patient="P001")


def test_ct_small_decodes_to_hu(tmp_path):
    s = scan_of(tmp_path, "CT_small.dcm")
    ds = pydicom.dcmread(os.path.join(FIXTURES, "CT_small.dcm"))
    raw = np.frombuffer(ds.PixelData, dtype="<i2").reshape(128, 128)      # independent of the handlers
    assert s.hu.shape == (1, 128, 128) and s.hu.dtype == np.float32
    assert np.array_equal(s.hu[0], raw.astype(np.float32) - 1024)
    assert (s.hu.min(), s.hu.max()) == (-896, 1167)
    assert s.spacing[1:] == pytest.approx((0.661468, 0.661468))
    assert s.affine[:3, 3] == pytest.approx([float(v) for v in ds.ImagePositionPatient])


@pytest.mark.parametrize("compressed,reference,lossless", [("693_J2KR.dcm", "693_UNCR.dcm", True),
                                                           ("693_J2KI.dcm", "693_UNCI.dcm", False)])
def test_jpeg2000_matches_uncompressed(tmp_path, compressed, reference, lossless):
    a, b = scan_of(tmp_path, compressed), scan_of(tmp_path, reference)
    assert a.hu.shape == b.hu.shape == (1, 512, 512)
    if lossless:                       # header says 16 bits stored, the J2K stream 14
        assert np.array_equal(a.hu, b.hu) and (a.hu.min(), a.hu.max()) == (-3024, 1468)
    else:                              # header says 14, the stream 16; lossy
        diff = np.abs(a.hu - b.hu)
        assert diff.mean() < 5 and np.corrcoef(a.hu.ravel(), b.hu.ravel())[0, 1] > 0.999
        assert (b.hu.min(), b.hu.max()) == (-3995, 1812)


def test_j2k_pixel_representation_mismatch(tmp_path):
    s = scan_of(tmp_path, "J2K_pixelrep_mismatch.dcm")     # signed header, unsigned J2K stream; tilted head CT
    assert (s.hu.min(), s.hu.max()) == (-2000, 1896)
    assert np.mean(s.hu < -900) > 0.2                      # air around the head stays air


@pytest.mark.parametrize("name,lo,hi", [("bad_sequence.dcm", -1011, 1243),   # JPEG lossless, uint16
                                        ("explicit_VR-UN.dcm", -1024, 1186)])  # J2K, VRs all 'UN'
def test_other_real_encodings(tmp_path, name, lo, hi):
    s = scan_of(tmp_path, name)
    assert (s.hu.min(), s.hu.max()) == (lo, hi)


def test_enhanced_multiframe_ct(tmp_path):
    s = scan_of(tmp_path, "eCT_Supplemental.dcm")
    ds = pydicom.dcmread(os.path.join(FIXTURES, "eCT_Supplemental.dcm"))
    raw = np.frombuffer(ds.PixelData, dtype="<u2").reshape(2, 512, 512).astype(np.float32)
    z = [float(fg.PlanePositionSequence[0].ImagePositionPatient[2]) for fg in ds.PerFrameFunctionalGroupsSequence]
    # IOP (-1,0,0, 0,1,0): normal -z, so sorted slices run to decreasing z; rescale -1024 from the groups
    order = np.argsort(-np.array(z))
    assert np.array_equal(s.hu, raw[order] - 1024) and (s.hu.min(), s.hu.max()) == (-1024, 172)
    assert s.spacing == pytest.approx((10.0, 0.388672, 0.388672))
    assert s.affine[0, 0] == pytest.approx(-0.388672) and s.affine[2, 2] == pytest.approx(-10.0)
    assert s.slice_uids == [str(ds.SOPInstanceUID)] * 2


def test_rtstruct_fixture_parses(tmp_path):
    path = tmp_path / "RS"                                  # no preamble, no meta: found by its tags
    shutil.copy(os.path.join(FIXTURES, "rtstruct.dcm"), str(path))
    affine = np.diag([10.0, 10.0, 10.0, 1.0])
    affine[:3, 3] = (-245, -195, -200)                      # pixel centres off the rectangle's edges
    grid = Scan(hu=np.zeros((3, 40, 50), np.float32), mask=None, spacing=(10.0, 10.0, 10.0), affine=affine,
                source_kind="nifti")
    with pytest.raises(BadInput) as e:                      # ROIs 'patient', 'Isocenter 1/2': no tumor
        readers.load_roi_mask(str(path), grid)
    assert "'patient'" in str(e.value) and "'Isocenter 1'" in str(e.value) and "file RS:" in str(e.value)
    m = readers.load_roi_mask(str(path), grid, roi_regex="^patient$")
    assert m.shape == (3, 40, 50) and list(m.sum(axis=(1, 2))) == [40 * 30] * 3
    assert m[:, 5:35, 5:45].all()


@pytest.mark.parametrize("name,keep,words", [("CT_small.dcm", 0.6, "truncated pixel data"),
                                              ("693_J2KR.dcm", 0.6, "no pixel data"),
                                              ("eCT_Supplemental.dcm", 0.3, "truncated pixel data"),
                                              ("CT_small.dcm", 0.01, "unreadable DICOM")])
def test_truncated_real_files_are_refused(tmp_path, name, keep, words):
    folder = tmp_path / "p"
    (folder / "deep" / "er").mkdir(parents=True)
    data = open(os.path.join(FIXTURES, name), "rb").read()
    (folder / "deep" / "er" / "x.dcm").write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(BadInput) as e:
        readers.load_scan(str(folder), patient="P004")
    assert str(e.value).startswith("patient P004, file deep/er/x.dcm: ") and words in str(e.value)
