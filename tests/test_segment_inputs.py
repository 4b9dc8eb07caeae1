"""tools/segment.py with what users bring: character sets and names in the DICOM, hostile paths and ROI
patterns through `make segment` in real Caffe, error lines that name no path or patient, and the settings a
model's run folder gives (decision rule, HU window, resize)."""
import json
import os

import numpy as np
import pydicom
import pytest

import paper
from segment_support import cli_error
from tools import seg_output
from tools import segment as seg


# --- character sets, names, ROI=, hostile paths through `make segment` in real Caffe -------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOSTILE = "a b 'q' \"d\" $HOME $(touch pwned1) `touch pwned2` ü漢"


def _series(folder, p, charset=None, name=None, blank_sop=False):
    """The phantom's CT series (and its RTSTRUCT) written again with a character set, a patient name and
    a SOPClassUID left present but empty, as de-identification tools leave it."""
    from data_prep import phantoms
    os.makedirs(folder, exist_ok=True)
    uids = phantoms.patient_uids(p)
    cts = phantoms.ct_datasets(p, uids)
    rs = phantoms.rtstruct_dataset(p, cts, uids)
    for ds in cts + [rs]:
        if charset is not None:
            ds.SpecificCharacterSet = charset
        if name is not None:
            ds.PatientName = name
    for k, ds in enumerate(cts):
        if blank_sop:
            ds.SOPClassUID = ""
        pydicom.dcmwrite(os.path.join(folder, "%03d" % k), ds, write_like_original=False)
    return rs


@pytest.mark.parametrize("charset,name", [("ISO_IR 100", "Müller^Jürgen"), ("ISO_IR 192", "Łukasz^Żółć"),
                                          (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎")])
def test_seg_dcm_keeps_the_source_character_set(phantom, tmp_path, charset, name):
    from data_prep import readers
    p, _ = phantom
    folder = str(tmp_path / "scan")
    _series(folder, p, charset, name)
    scan = readers.load_scan(folder)
    path = str(tmp_path / "seg.dcm")
    seg_output.write_seg(path, p["mask"], scan)
    out, src = pydicom.dcmread(path), pydicom.dcmread(os.path.join(folder, "000"))
    assert out.SpecificCharacterSet == src.SpecificCharacterSet
    assert str(out.PatientName) == str(src.PatientName) == name


def test_error_line_names_no_path_and_no_patient(tmp_path, capsys):
    folder = tmp_path / "Doe_Jane_1955" / "CT scan"
    folder.mkdir(parents=True)
    (folder / "image.nii.gz").write_bytes(b"\x1f\x8b\x08 this is no NIfTI")
    model = tmp_path / "m.caffemodel"
    model.write_bytes(b"\0" * 16)
    line = cli_error(["--scan", str(folder / "image.nii.gz"), "--box", "1,1,9,9", "--model", str(model),
                       "--out", str(tmp_path / "out")], capsys)
    assert "unreadable" in line and "image.nii.gz" in line
    assert str(tmp_path) not in line and "Doe_Jane" not in line and "CT scan" not in line, line


def _make(*args):
    import subprocess
    return subprocess.run(["make", "--no-print-directory", "-C", REPO] + list(args), capture_output=True,
                          text=True, cwd=REPO)


@pytest.mark.skipif(not __import__("shutil").which("make"), reason="no make")
def test_make_segment_hostile_paths_blank_sop_class_charset_and_roi_pattern(phantom, filler_model, tmp_path):
    """`make segment` for real (Caffe's deploy net): SCAN, ROI_FILE, MODEL and OUT in folders named with
    spaces, quotes, $, backticks and unicode; a de-identified series (SOPClassUID empty, UTF-8 name); the
    tumor ROI named 'CTV_main', chosen by ROI='^gtv$|^ctv_main$' (the default pattern matches no ROI)."""
    import shutil
    p, _ = phantom
    root = tmp_path / HOSTILE
    scan = str(root / ("scan " + HOSTILE))
    rs = _series(scan, p, "ISO_IR 192", "Łukasz^Żółć", blank_sop=True)
    for roi in rs.StructureSetROISequence:
        if roi.ROIName == "GTV-1":
            roi.ROIName = "CTV_main"
            for rc in rs.ROIContourSequence:          # two slices of it: two forwards on 2 cores
                if rc.ReferencedROINumber == roi.ROINumber:
                    rc.ContourSequence = rc.ContourSequence[len(rc.ContourSequence) // 2:][:2]
    roi_file = str(root / ("rs " + HOSTILE + ".dcm"))
    pydicom.dcmwrite(roi_file, rs, write_like_original=False)
    model = str(root / ("model " + HOSTILE + ".caffemodel"))
    shutil.copy(filler_model, model)
    out = str(root / ("out " + HOSTILE))
    base = ["SCAN=" + scan, "ROI_FILE=" + roi_file, "MODEL=" + model, "OUT=" + out, "BATCH=4"]
    r = _make("segment", *base)
    assert r.returncode != 0 and "no ROI matches" in r.stderr and "'CTV_main'" in r.stderr   # default pattern
    r = _make("segment", *base, "ROI=^gtv$|^ctv_main$")
    assert r.returncode == 0, r.stderr
    summary = json.load(open(os.path.join(out, "summary.json")))
    from data_prep import readers
    box_xy, (z0, z1) = seg.roi_extent(readers.load_roi_mask(roi_file, readers.load_scan(scan), "^ctv_main$"))
    assert summary["box_xy"] == list(box_xy) and summary["slices"] == [z0, z1] and 1 <= z1 - z0 <= 2
    assert sorted(os.listdir(out)) == ["mask.nii.gz", "overlays", "prob.nii.gz", "seg.dcm", "summary.json"]
    assert str(pydicom.dcmread(os.path.join(out, "seg.dcm")).PatientName) == "Łukasz^Żółć"
    for where in (REPO, str(tmp_path), str(root), os.getcwd()):
        assert not any(os.path.exists(os.path.join(where, n)) for n in ("pwned1", "pwned2"))


def test_the_model_runs_own_settings_are_used(tmp_path):
    """A caffemodel in a train.py run folder brings its decision rule (run.json) and its data's HU window and
    resize mode (manifest); the command line overrides them; elsewhere the report's defaults apply."""
    import json
    data, run = tmp_path / "data", tmp_path / "run"
    (run / "snapshots").mkdir(parents=True)
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"params": {"hu_window": [-1000.0, 400.0], "resize": "antialias"}}))
    (run / "run.json").write_text(json.dumps({"decision": "prior", "class_weights": [0.04, 0.96], "data": str(data)}))
    for model in (run / "final.caffemodel", run / "snapshots" / "ts_fcn_iter_5.caffemodel"):
        model.write_bytes(b"x")
        got = seg.model_settings(str(model))
        assert got["threshold"] == pytest.approx(0.96)
        assert got["hu_window"] == [-1000.0, 400.0] and got["resize"] == "antialias"
    alone = tmp_path / "elsewhere.caffemodel"
    alone.write_bytes(b"x")
    assert seg.model_settings(str(alone)) == {"threshold": 0.5, "hu_window": list(paper.HU_WINDOW),
                                              "resize": paper.DEFAULT_RESIZE,
                                              "from": "defaults (no run.json beside the model)"}
    assert (seg.threshold_mask(np.array([0.5, 0.96, 0.97]), 0.96) == [0, 0, 1]).all()   # score.predict's rule


def test_segment_uses_the_runs_threshold_end_to_end(phantom, tmp_path):
    """make segment with a model in a run folder thresholds at the run's p > 0.96, unless --threshold says otherwise."""
    import json
    p, folder = phantom
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"decision": "prior", "class_weights": [0.04, 0.96]}))
    model = run / "final.caffemodel"
    model.write_bytes(b"")
    box_xy, (z0, z1) = seg.roi_extent(p["mask"])
    flat = lambda x: np.full((len(x), 100, 100), 0.9, np.float32)        # p = 0.9 everywhere in the box
    base = ["--scan", folder, "--box", ",".join(map(str, box_xy)), "--slices", "%d:%d" % (z0, z1),
            "--model", str(model), "--no-png"]
    s = seg.run(seg.build_parser().parse_args(base + ["--out", str(tmp_path / "a")]), predictor_factory=lambda: flat)
    assert s["threshold"] == pytest.approx(0.96) and s["tumor_voxels"] == 0 and s["settings_from"].startswith("run.json")
    s = seg.run(seg.build_parser().parse_args(base + ["--out", str(tmp_path / "b"), "--threshold", "0.5"]),
                predictor_factory=lambda: flat)
    assert s["threshold"] == 0.5 and s["tumor_voxels"] > 0
