"""Fixtures shared by several test modules."""
import pytest

import segment_support


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """A small phantom patient (DICOM CT + RTSTRUCT) and its folder (named like a patient's, for the redaction
    checks)."""
    return segment_support.make_phantom(str(tmp_path_factory.mktemp("phantom") / "Doe_Jane_scan"))


@pytest.fixture(scope="module")
def filler_model(tmp_path_factory):
    """A caffemodel of the real deploy net, as its fillers make it (untrained, real Caffe)."""
    return segment_support.make_filler_model(str(tmp_path_factory.mktemp("model") / "filler.caffemodel"))
