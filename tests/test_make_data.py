"""`make data` end to end on a tiny mixed-format phantom cohort (RTSTRUCT, SEG, NIfTI, NRRD):
HDF5 contents against the phantoms' truth, folds and lists, pseudonyms, idempotent rerun, an
interrupted run, bad input (stop / --skip-bad), and the CLI."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import paper
from data_prep import augment, crop, hdf5_io, intensity, make_data, phantoms

SIZE, SLICES = 96, 40
# Input folder names: sorted order gives the pseudonyms; they must never leak into outputs.
NAMES = {"rtstruct": "Doe^Jane 0001", "seg": "Roe^Rick ..", "nifti": "Smith^Ann", "nrrd": "zz-$(touch pwned)"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    raw = str(tmp_path_factory.mktemp("raw"))
    truth = {}
    for i, kind in enumerate(phantoms.KINDS):
        p = phantoms.make_patient(0, i, kind=kind, n_slices=SLICES, size=SIZE)
        phantoms.write_patient(os.path.join(raw, NAMES[kind]), p)
        truth[NAMES[kind]] = p
    os.makedirs(os.path.join(raw, ".truth"))            # hidden: must be ignored
    with open(os.path.join(raw, ".truth", "x.npz"), "w") as f:
        f.write("not a patient")
    with open(os.path.join(raw, "README.txt"), "w") as f:   # a plain file: ignored
        f.write("cohort notes")
    return raw, truth


def _run(argv, capsys):
    rc = make_data.main(argv + ["--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


def _subset(cohort, tmp_path, kinds):
    raw, truth = cohort
    sub = str(tmp_path / "raw")
    os.makedirs(sub)
    for kind in kinds:
        os.symlink(os.path.join(raw, NAMES[kind]), os.path.join(sub, NAMES[kind]))
    return sub


def _all_bytes(folder, skip=()):
    for root, _, files in os.walk(folder):
        for f in files:
            if f not in skip:
                with open(os.path.join(root, f), "rb") as fh:
                    yield os.path.join(root, f), fh.read()


def test_mixed_cohort_end_to_end(cohort, tmp_path, capsys):
    raw, truth = cohort
    data = str(tmp_path / "data")
    rc, out, err = _run(["--raw", raw, "--data", data, "--folds", "2", "--seed", "0", "--jobs", "2"], capsys)
    assert rc == 0, err
    man = json.load(open(os.path.join(data, "manifest.json")))
    key = json.load(open(os.path.join(data, "pseudonym_key.json")))["pseudonyms"]
    assert key == {"P%03d" % (i + 1): n for i, n in enumerate(sorted(NAMES.values()))}
    ids = [p["id"] for p in man["patients"]]
    assert ids == ["P001", "P002", "P003", "P004"] and man["skipped"] == []
    assert sorted(sum(man["folds"], [])) == ids and [len(f) for f in man["folds"]] == [2, 2]
    assert man["params"]["folds"] == 2 and man["params"]["hu_window"] == list(paper.HU_WINDOW)
    assert {p["source_kind"] for p in man["patients"]} == {"dicom-rtstruct", "dicom-seg", "nifti", "nrrd"}

    for entry in man["patients"]:
        p = truth[key[entry["id"]]]
        tumor = np.flatnonzero(p["mask"].any(axis=(1, 2)))
        assert entry["slices"] == tumor.tolist()
        box = crop.patient_boxes(p["mask"])[int(tumor[0])]
        assert entry["box_side"] == box.side and entry["box_center"] == [box.row, box.col]
        np.testing.assert_allclose(entry["spacing"], p["spacing"], rtol=1e-5)
        h5 = hdf5_io.read_patient_h5(os.path.join(data, entry["h5"]))
        aug = hdf5_io.read_augmented(os.path.join(data, entry["h5_aug"]))
        # one training file per image, so Caffe's HDF5Data shuffles the images uniformly
        assert hdf5_io.augmented_files(os.path.join(data, entry["h5_aug"])) == [
            "z%04d_a%d.h5" % (z, a) for z in tumor for a in range(paper.AUGMENTATIONS)]
        n = len(tumor)
        assert h5["data"].shape == (n, 3, 100, 100) and h5["label"].shape == (n, 1, 100, 100)
        assert aug["data"].shape == (8 * n, 3, 100, 100) and aug["slice"].tolist() == np.repeat(tumor, 8).tolist()
        # the images are the truth's HU, cropped, windowed and mean-subtracted
        want = intensity.hu_to_net(crop.crop_slice(p["hu"][tumor], box))
        np.testing.assert_allclose(h5["data"], want, atol=1e-3)
        # the labels: the truth mask cropped (RTSTRUCT/SEG/NIfTI/NRRD all give it back)
        want_lab = crop.crop_label(p["mask"][tumor], box)
        inter = (h5["label"][:, 0] * want_lab).sum()
        assert 2 * inter / (h5["label"].sum() + want_lab.sum()) >= 0.98
        assert set(np.unique(h5["label"])) <= {0.0, 1.0} and h5["label"].sum() > 0
        for k in range(8):
            np.testing.assert_array_equal(augment.invert(k, aug["data"][k::8]), h5["data"])
            np.testing.assert_array_equal(augment.invert(k, aug["label"][k::8]), h5["label"])

    for k, val_ids in enumerate(man["folds"]):
        fold_dir = os.path.join(data, "fold%d" % k)
        train = open(os.path.join(fold_dir, "train.txt")).read().split()
        val = open(os.path.join(fold_dir, "val.txt")).read().split()
        assert val == ["../patients/%s.h5" % i for i in val_ids]
        slices = {e["id"]: e["slices"] for e in man["patients"]}
        assert train == ["../patients/%s_aug/z%04d_a%d.h5" % (i, z, a) for i in ids if i not in val_ids
                         for z in slices[i] for a in range(paper.AUGMENTATIONS)]
        assert all(os.path.isfile(os.path.join(fold_dir, t)) for t in train + val)
    assert "fold0" in out and "total" in out

    # no input folder name anywhere but the key file, nor in the logs; nothing written outside DATA
    for path, blob in _all_bytes(data, skip=("pseudonym_key.json",)):
        for name in NAMES.values():
            assert name.encode() not in blob, path
    for name in NAMES.values():
        assert name not in out and name not in err
    assert not os.path.exists("pwned") and not os.path.exists(os.path.join(raw, "pwned"))
    assert sorted(os.listdir(data)) == [".make_data.lock", "fold0", "fold1", "manifest.json", "patients",
                                        "pseudonym_key.json"]
    assert sorted(os.listdir(os.path.join(data, "patients"))) == sorted(
        ["P%03d%s" % (i, s) for i in range(1, 5) for s in (".h5", "_aug")])


def test_interrupted_run_then_idempotent_rerun(cohort, tmp_path, capsys, monkeypatch):
    raw = _subset(cohort, tmp_path, ("rtstruct", "nifti", "nrrd"))
    data = str(tmp_path / "data")
    args = ["--raw", raw, "--data", data, "--folds", "3", "--jobs", "1"]
    real_file = hdf5_io.h5py.File

    class DiesMidWrite:
        """h5py.File that writes, then 'crashes' (disk full) for the un-augmented file of P002."""
        def __init__(self, path, mode="r"):
            self.f = real_file(path, mode)
            self.dies = mode == "w" and "P002.tmp" in os.path.basename(path)

        def __enter__(self):
            return self.f.__enter__()

        def __exit__(self, *exc):
            self.f.__exit__(*exc)
            if self.dies:
                raise OSError("simulated crash while writing")

    monkeypatch.setattr(hdf5_io.h5py, "File", DiesMidWrite)
    rc, out, err = _run(args, capsys)
    # an error writing DATA is DATA's, not the patient's: one line naming DATA and the error
    assert rc == 1 and err.strip().splitlines() == ["make_data: error: cannot write DATA %s: simulated crash "
                                                    "while writing" % data], err
    left = sorted(os.listdir(os.path.join(data, "patients")))
    assert left == ["P001.h5", "P001_aug", "P002_aug"]   # no half-written P002.h5, no temp file
    assert not any(n.startswith(".") for n in os.listdir(os.path.join(data, "patients", "P002_aug")))
    assert not os.path.exists(os.path.join(data, "manifest.json"))
    monkeypatch.setattr(hdf5_io.h5py, "File", real_file)

    p1 = os.path.join(data, "patients", "P001.h5")
    before = os.stat(p1).st_mtime_ns
    rc, out, err = _run(args, capsys)
    assert rc == 0, err
    assert "2 patient(s) processed, 1 already done, 0 skipped" in out
    assert os.stat(p1).st_mtime_ns == before
    man = json.load(open(os.path.join(data, "manifest.json")))
    assert [len(f) for f in man["folds"]] == [1, 1, 1]

    rc, out, err = _run(args, capsys)
    assert rc == 0 and "0 patient(s) processed, 3 already done" in out
    first = hdf5_io.read_patient_h5(p1)["data"]
    # another parameter (HU window, SPEC §7) redoes every patient
    rc, out, err = _run(args + ["--hu-window", "-1000,400"], capsys)
    assert rc == 0 and "3 patient(s) processed, 0 already done" in out
    assert not np.allclose(hdf5_io.read_patient_h5(p1)["data"], first)
    assert json.load(open(os.path.join(data, "manifest.json")))["params"]["hu_window"] == [-1000.0, 400.0]
    # fewer folds later: the lists of the old fold2 go away
    rc, out, err = _run(args[:-4] + ["--folds", "2", "--jobs", "1", "--hu-window", "-1000,400"], capsys)
    assert rc == 0 and not os.path.exists(os.path.join(data, "fold2"))


def test_bad_patient_stops_or_is_skipped(cohort, tmp_path, capsys):
    import nibabel as nib
    raw = _subset(cohort, tmp_path, ("nifti", "nrrd", "seg"))
    bad = os.path.join(raw, "Bad^Case")           # sorts first -> P001
    shutil.copytree(os.path.join(cohort[0], NAMES["nifti"]), bad)
    mask_path = [os.path.join(bad, f) for f in os.listdir(bad) if f.startswith("mask")][0]
    m = nib.load(mask_path)
    nib.save(nib.Nifti1Image(np.zeros(m.shape, np.uint8), m.affine), mask_path)   # empty mask
    data = str(tmp_path / "data")
    rc, out, err = _run(["--raw", raw, "--data", data, "--folds", "3", "--jobs", "1"], capsys)
    assert rc == 2
    line = [l for l in err.splitlines() if "error" in l]
    assert len(line) == 1 and "patient P001, file" in line[0] and "Bad^Case" not in err
    assert not os.path.exists(os.path.join(data, "manifest.json"))

    rc, out, err = _run(["--raw", raw, "--data", data, "--folds", "3", "--jobs", "2", "--skip-bad"], capsys)
    assert rc == 0, err
    man = json.load(open(os.path.join(data, "manifest.json")))
    assert [s["id"] for s in man["skipped"]] == ["P001"] and "patient P001" in man["skipped"][0]["reason"]
    assert [p["id"] for p in man["patients"]] == ["P002", "P003", "P004"]
    assert "P001" not in sum(man["folds"], []) and man["summary"]["skipped"] == 1
    assert "skipped 1 patient(s)" in out and "P001:" in out
    assert not os.path.exists(os.path.join(data, "patients", "P001.h5"))


def test_slice_box_mode(cohort, tmp_path, capsys):
    raw = _subset(cohort, tmp_path, ("nifti", "nrrd"))
    data = str(tmp_path / "data")
    rc, out, err = _run(["--raw", raw, "--data", data, "--folds", "2", "--jobs", "1", "--box", "slice"], capsys)
    assert rc == 0, err
    man = json.load(open(os.path.join(data, "manifest.json")))
    truth = cohort[1]
    for entry in man["patients"]:
        boxes = crop.patient_boxes(truth[NAMES[entry["source_kind"]]]["mask"], mode="slice")
        assert entry["box_side"] == [boxes[z].side for z in entry["slices"]]
        assert entry["box_center"] == [[boxes[z].row, boxes[z].col] for z in entry["slices"]]


def test_cli_help_and_bad_option():
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "data_prep.make_data", "--help"], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0 and "--skip-bad" in r.stdout and "--hu-window" in r.stdout
    with pytest.raises(SystemExit) as e:
        make_data.main(["--raw", "x", "--data", "y", "--hu-window", "400,-1000"])
    assert e.value.code == 2


def test_pseudonyms_deterministic():
    names = ["b", "a", "c"]
    assert make_data.pseudonyms(names) == {"a": "P001", "b": "P002", "c": "P003"}
    assert make_data.pseudonyms(["n%d" % i for i in range(1200)])["n0"] == "P0001"


# --- hostile cohorts, output errors, one run per DATA -------------------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(args, prefix=()):
    """make_data as a separate process (optionally under a prefix such as unshare): rc, stderr lines."""
    r = subprocess.run(list(prefix) + [sys.executable, "-m", "data_prep.make_data"] + args + ["--no-progress"],
                       capture_output=True, text=True, cwd=REPO)
    return r.returncode, r.stderr.strip().splitlines(), r.stdout


def _damaged_copies(cohort, raw):
    """Copies of the DICOM RTSTRUCT patient, each with one fault (and one that is valid though odd)."""
    import pydicom
    src = os.path.join(cohort[0], NAMES["rtstruct"])

    def files(folder):
        out = {}
        for r, _, fs in os.walk(folder):
            for f in fs:
                out[os.path.join(r, f)] = pydicom.dcmread(os.path.join(r, f), stop_before_pixels=True).Modality
        return out

    def each(folder, modality, fn):
        for path, m in sorted(files(folder).items()):
            if m == modality:
                ds = pydicom.dcmread(path)
                if fn(ds) is not False:
                    ds.save_as(path)

    faults = {}
    for name, modality, fn, words in (
            ("a_frame", "RTSTRUCT", lambda ds: [setattr(r, "ReferencedFrameOfReferenceUID", "1.2.3.4")
                                                 for r in ds.StructureSetROISequence],
             "another frame of reference"),
            ("b_rows", "CT", lambda ds: setattr(ds, "Rows", 65535) if ds.InstanceNumber == 3 else False,
             "beyond any CT"),
            ("c_rescale", "CT", lambda ds: ds.__delattr__("RescaleIntercept"), "without RescaleIntercept"),
            ("d_blank_sop", "CT", lambda ds: setattr(ds, "SOPClassUID", ""), None)):     # valid: kept
        folder = os.path.join(raw, name)
        shutil.copytree(src, folder)
        each(folder, modality, fn)
        faults[name] = words
    folder = os.path.join(raw, "e_truncated")
    shutil.copytree(src, folder)
    rs = [p for p, m in files(folder).items() if m == "RTSTRUCT"][0]
    data = open(rs, "rb").read()
    open(rs, "wb").write(data[:len(data) * 2 // 3])
    faults["e_truncated"] = "truncated RTSTRUCT"
    return faults


def test_hostile_cohort_skip_bad_keeps_every_good_patient(cohort, tmp_path, capsys):
    raw = _subset(cohort, tmp_path, ("nifti", "nrrd"))
    faults = _damaged_copies(cohort, raw)
    data = str(tmp_path / "data")
    rc, err, out = _cli(["--raw", raw, "--data", data, "--folds", "2", "--jobs", "2"])
    key = json.load(open(os.path.join(data, "pseudonym_key.json")))["pseudonyms"]
    bad = [(p, faults[n]) for p, n in key.items() if faults.get(n)]
    assert rc == 2 and any(err[0].startswith("make_data: error: patient %s, file " % p) and w in err[0]
                           for p, w in bad), err
    assert not os.path.exists(os.path.join(data, "manifest.json"))

    rc, err, out = _cli(["--raw", raw, "--data", data, "--folds", "2", "--jobs", "2", "--skip-bad"])
    assert rc == 0, err
    man = json.load(open(os.path.join(data, "manifest.json")))
    key = json.load(open(os.path.join(data, "pseudonym_key.json")))["pseudonyms"]
    kept = sorted(key[p["id"]] for p in man["patients"])
    assert kept == sorted(["d_blank_sop", NAMES["nifti"], NAMES["nrrd"]])
    reasons = {key[s["id"]]: s["reason"] for s in man["skipped"]}
    assert sorted(reasons) == sorted(n for n, w in faults.items() if w)
    for name, reason in reasons.items():
        assert reason.startswith("patient %s, file " % [p for p, n in key.items() if n == name][0])
        assert faults[name] in reason, reason
        assert "Phantom" not in reason and raw not in reason and name not in reason
    assert "skipped 4 patient(s):" in out


def _unshare(tmp_path):
    """`unshare` options for a private mount namespace where mounting works here, else None. In the
    runtime's chroot / is no mount point, so the propagation is left as is -- only where the mounts
    are private already (runtime.sh's namespace), so that nothing can leak out."""
    probe = tmp_path / "probe"
    probe.mkdir()
    test = ["sh", "-c", "mount -t tmpfs -o size=64k tmpfs \"$0\"", str(probe)]
    for opts in (["--propagation", "private"], ["--propagation", "unchanged"]):
        if opts[1] == "unchanged":
            r = subprocess.run(["findmnt", "-no", "PROPAGATION", "-T", str(probe)], capture_output=True, text=True)
            if r.returncode != 0 or r.stdout.strip() != "private":
                return None
        if subprocess.run(["unshare", "-m"] + opts + test, capture_output=True).returncode == 0:
            return ["unshare", "-m"] + opts
    return None


@pytest.mark.parametrize("fault", ["read-only", "disk full"])
def test_output_errors_stop_the_run_and_blame_data(cohort, tmp_path, fault):
    raw = _subset(cohort, tmp_path, ("nifti", "nrrd"))
    data = str(tmp_path / "out data")
    os.makedirs(data)
    args = ["--raw", raw, "--data", data, "--folds", "2", "--jobs", "2"]
    unshare = _unshare(tmp_path)
    if os.geteuid() != 0 and fault == "read-only":
        prefix = ()
        os.chmod(data, 0o555)
    elif unshare:
        # a private mount namespace: the read-only bind or the tiny file system vanish with the process
        mount = ("mount --bind \"$1\" \"$1\" && mount -o remount,bind,ro \"$1\"" if fault == "read-only"
                 else "mount -t tmpfs -o size=96k tmpfs \"$1\"")
        prefix = tuple(unshare) + ("sh", "-c", mount + " && shift && exec \"$@\"", "sh", data)
    else:
        pytest.skip("needs root (mount namespaces) to fill a file system")
    for extra in ([], ["--skip-bad"]):
        rc, err, out = _cli(args + extra, prefix)
        assert rc == 1 and len(err) == 1, err
        assert err[0].startswith("make_data: error: cannot write DATA %s: " % data), err
        assert ("Read-only file system" in err[0] or "Permission denied" in err[0]) if fault == "read-only" \
            else ("No space left on device" in err[0] or "errno = 28" in err[0]), err
        assert "patient P0" not in err[0] and "skipped" not in out
    os.chmod(data, 0o755)
    assert not os.path.exists(os.path.join(data, "manifest.json"))


def test_a_second_run_on_the_same_data_refuses(cohort, tmp_path):
    import fcntl
    raw = _subset(cohort, tmp_path, ("nifti", "nrrd"))
    data = str(tmp_path / "data")
    os.makedirs(data)
    with open(os.path.join(data, make_data.LOCK_FILE), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)           # a first run holds DATA
        rc, err, out = _cli(["--raw", raw, "--data", data, "--folds", "2", "--jobs", "1"])
    assert rc == 1 and len(err) == 1 and "is in use by another make data run" in err[0], err
    assert os.listdir(data) == [make_data.LOCK_FILE]                  # nothing written, nothing removed
    rc, err, out = _cli(["--raw", raw, "--data", data, "--folds", "2", "--jobs", "1"])   # lock released
    assert rc == 0, err
