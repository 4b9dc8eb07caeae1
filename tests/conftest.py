"""Fixtures shared by several test modules, and the suite's cleanup."""
import shutil

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


def pytest_sessionfinish(session, exitstatus):
    """A passing run leaves nothing behind in /tmp: its temporary folders (nets, phantoms, HDF5: over a GB)
    go. A failing run keeps them to look at, and so does a run given its own --basetemp."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    if exitstatus == 0 and factory is not None and session.config.option.basetemp is None:
        basetemp = factory.getbasetemp()
        shutil.rmtree(str(basetemp), ignore_errors=True)
        current = basetemp.parent / "pytest-current"          # pytest's link to the newest run
        if current.is_symlink() and not current.exists():
            current.unlink()
