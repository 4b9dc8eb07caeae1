"""`make data`: a cohort folder -> tumor crops -> per-patient HDF5 files and patient folds (SPEC §5).

Owns the pipeline and the DATA layout:

    DATA/manifest.json        params, folds, patients [{id, slices, box_side, box_center, spacing,
                              source_kind, h5, h5_aug, images, images_aug}], skipped [{id, reason}]
    DATA/pseudonym_key.json   pseudonym -> input folder name (the ONLY place input names appear)
    DATA/.make_data.lock      the lock a run holds (flock; empty file, kept between runs)
    DATA/patients/P001.h5     un-augmented crops (validation)
    DATA/patients/P001_aug/   8x augmented crops (training), one file z<slice>_a<k>.h5 per image so
                              that Caffe's HDF5Data shuffles them uniformly (data_prep/hdf5_io.py)
    DATA/fold<k>/train.txt    the augmented files of the other folds' patients, relative to DATA/fold<k>
    DATA/fold<k>/val.txt      the .h5 files of fold k's patients, relative to DATA/fold<k>

Per patient: data_prep.readers.load_patient -> tumor slices only -> boxes (data_prep.crop) -> crops ->
HU window, 3 channels, FCN means (data_prep.intensity) -> 8x augmentation (data_prep.augment) ->
HDF5 (data_prep.hdf5_io), in parallel over patients (--jobs). Patients are named P001, P002, ... in
the sorted order of the input folder names; hidden folders (such as the phantom generator's .truth/)
are ignored. Output paths are built from pseudonyms only, so no input name can steer a write.

Input faults and output faults are kept apart. Bad input (data_prep.errors.BadInput) is the patient's:
it stops the run with its one-line message and exit status 2, or with --skip-bad is listed in the
manifest ("skipped") and the summary while every good patient is kept. An error writing DATA (read-only
folder, disk full, files removed under the run) is never the patient's: it stops the run, whatever
--skip-bad says, with one line naming DATA and the OS error, and exit status 1 (OutputError). One run
at a time per DATA: the run holds an exclusive lock on DATA/.make_data.lock (flock, released by the
kernel when the process ends, even by kill -9), and a second run on the same DATA refuses with one line
instead of deleting the first one's temporary files.

Idempotent and atomic: every file is written to a temporary name and renamed; each patient's HDF5
files carry a hash of the processing parameters and of the input folder's file listing (names, sizes,
mtimes), and a rerun skips the patients whose two files exist and match.

Non-axial scans are refused by the readers, never resampled (data_prep.dicom_series says why).
"""
import argparse
import contextlib
import fcntl
import hashlib
import json
import multiprocessing
import os
import re
import sys
import time
from typing import Dict, List, Optional

import numpy as np

import atomic
import paper
from data_prep import augment, crop, folds, hdf5_io, intensity
from data_prep.errors import BadInput, redact

FORMAT_VERSION = 1
PATIENTS_DIR = "patients"
MANIFEST = "manifest.json"
KEY_FILE = "pseudonym_key.json"
LOCK_FILE = ".make_data.lock"


class OutputError(Exception):
    """Writing DATA failed (read-only, disk full, files removed under the run): never the input's fault."""

    def __init__(self, data_dir, error):
        self.data_dir = str(data_dir)
        self.error = " ".join(("%s" % error if isinstance(error, (OSError, str)) else
                               "%s: %s" % (type(error).__name__, error)).split())
        super().__init__(self.data_dir, self.error)

    def __str__(self):
        return "cannot write DATA %s: %s" % (self.data_dir, self.error)


@contextlib.contextmanager
def writing(data_dir, errors=(OSError,)):
    """Turn the `errors` raised while writing DATA into an OutputError."""
    try:
        yield
    except OutputError:
        raise
    except errors as e:
        raise OutputError(data_dir, e) from e


@contextlib.contextmanager
def data_lock(data_dir):
    """Hold DATA's lock for the run; a second run on the same DATA refuses (SystemExit, one line)."""
    with writing(data_dir):
        os.makedirs(data_dir, exist_ok=True)
        fd = os.open(os.path.join(data_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit("make_data: error: DATA %s is in use by another make data run (it holds %s); "
                             "wait for that run to end, or give another DATA" % (data_dir, LOCK_FILE))
        yield
    finally:
        os.close(fd)


# --- parameters ------------------------------------------------------------------------------------
def make_params(roi=paper.ROI_REGEX, box=paper.DEFAULT_BOX_MODE, hu_window=paper.HU_WINDOW,
                resize=paper.DEFAULT_RESIZE) -> Dict:
    """The per-patient processing parameters (everything that changes a patient's HDF5 files)."""
    if box not in paper.BOX_MODES:
        raise ValueError("box mode %r not in %s" % (box, paper.BOX_MODES))
    if resize not in paper.RESIZE_MODES:
        raise ValueError("resize mode %r not in %s" % (resize, paper.RESIZE_MODES))
    re.compile(roi)
    return {
        "format_version": FORMAT_VERSION,
        "roi": roi,
        "box": box,
        "hu_window": [float(hu_window[0]), float(hu_window[1])],
        "box_min_side": paper.BOX_MIN_SIDE,
        "box_scale": paper.BOX_SCALE,
        "air_hu": paper.AIR_HU,
        "input_size": paper.INPUT_SIZE,
        "label_threshold": paper.LABEL_THRESHOLD,
        "bgr_mean": list(paper.FCN_BGR_MEAN),
        "augmentations": paper.AUGMENTATIONS,
        "resize": resize,
    }


def params_hash(params: Dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def input_hash(folder: str) -> str:
    """A fingerprint of a patient folder: relative paths, sizes and mtimes of its files (hashed, so no
    file name is stored)."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            h.update(("%s\0%d\0%d\n" % (os.path.relpath(path, folder), st.st_size, st.st_mtime_ns)).encode(
                "utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


# --- cohort ----------------------------------------------------------------------------------------
def list_patients(raw: str) -> List[str]:
    """Sorted names of the non-hidden sub-folders of RAW."""
    if not os.path.isdir(raw):
        raise SystemExit("make_data: RAW %s is not a folder" % raw)
    return sorted(n for n in os.listdir(raw) if not n.startswith(".") and os.path.isdir(os.path.join(raw, n)))


def pseudonyms(names: List[str]) -> Dict[str, str]:
    """input folder name -> P001, P002, ... in sorted order (at least 3 digits)."""
    width = max(3, len(str(len(names))))
    return {name: "P%0*d" % (width, i + 1) for i, name in enumerate(sorted(names))}


def h5_paths(data_dir: str, pid: str):
    rel = os.path.join(PATIENTS_DIR, pid + ".h5"), os.path.join(PATIENTS_DIR, pid + "_aug")
    return rel, tuple(os.path.join(data_dir, r) for r in rel)


# --- one patient -----------------------------------------------------------------------------------
def _scrub(text: str, folder: str) -> str:
    """Remove the input folder's path and name from a message (no input names in logs)."""
    folder = os.path.normpath(folder)
    return " ".join(redact(text, {os.path.abspath(folder), folder, os.path.basename(folder)},
                           ignore_case=False).split())


TMP_RE = re.compile(r"^\..*\.tmp\d+(\..*)?$")


def remove_stale_temps(data_dir: str) -> None:
    """Temporary files of writers killed mid-write (atomic.atomic_path names: .<base>.tmp<pid><ext>)."""
    for folder, _, names in os.walk(os.path.join(data_dir, PATIENTS_DIR)):
        for name in names:
            if TMP_RE.match(name):
                try:
                    os.remove(os.path.join(folder, name))
                except OSError:
                    pass


def _load(folder, pid, roi):
    from data_prep import readers    # imported late: heavy DICOM dependencies
    return readers.load_patient(folder, roi, patient=pid)


def process_patient(folder: str, pseudonym: str, params: Dict, data_dir: str,
                    timings: Optional[Dict[str, float]] = None) -> Dict:
    """Read, crop, map and augment one patient and write DATA/patients/<pseudonym>.h5 and
    DATA/patients/<pseudonym>_aug/ (one file per augmented image).

    Returns its manifest entry. `timings`, if given, is filled with seconds per stage: read, boxes,
    crop, intensity, augment, write, write_aug, plus preprocess (boxes..augment) and total.
    Raises BadInput (naming the pseudonym) for unusable input.
    """
    t = timings if timings is not None else {}
    t0 = time.perf_counter()
    scan = _load(folder, pseudonym, params["roi"])
    t1 = time.perf_counter()
    t["read"] = t1 - t0
    if scan.mask is None or not np.any(scan.mask):
        raise BadInput(pseudonym, ".", "the tumor mask is empty (no slice has tumor voxels)")
    if scan.mask.shape != scan.hu.shape:
        raise BadInput(pseudonym, ".", "image %s and mask %s are on different grids"
                       % (scan.hu.shape, scan.mask.shape))
    boxes = crop.patient_boxes(scan.mask, mode=params["box"], scale=params["box_scale"],
                               min_side=params["box_min_side"])
    t2 = time.perf_counter()
    hu, labels, zs = crop.crop_patient(scan.hu, scan.mask, boxes, fill=params["air_hu"],
                                       size=params["input_size"], resize=params["resize"])
    t3 = time.perf_counter()
    data = intensity.hu_to_net(hu, window=params["hu_window"])
    t4 = time.perf_counter()
    data_aug, labels_aug = augment.augment8(data, labels)
    zs_aug = np.repeat(zs, paper.AUGMENTATIONS)
    t5 = time.perf_counter()

    ordered = [boxes[int(z)] for z in zs]
    if params["box"] == "patient":
        box_side, box_center = float(ordered[0].side), [float(ordered[0].row), float(ordered[0].col)]
    else:
        box_side = [float(b.side) for b in ordered]
        box_center = [[float(b.row), float(b.col)] for b in ordered]
    (rel, rel_aug), (path, path_aug) = h5_paths(data_dir, pseudonym)
    entry = {
        "id": pseudonym,
        "slices": [int(z) for z in zs],
        "box_side": box_side,
        "box_center": box_center,
        "spacing": [float(s) for s in scan.spacing],
        "source_kind": scan.source_kind,
        "shape": [int(s) for s in scan.hu.shape],
        "h5": rel,
        "h5_aug": rel_aug,
        "images": int(len(zs)),
        "images_aug": int(len(zs_aug)),
    }
    attrs = {"params_hash": params_hash(params), "input_hash": input_hash(folder),
             "entry": json.dumps(entry)}
    # The augmented files first: the un-augmented one is the "done" marker checked last. Whatever
    # fails here fails writing DATA (h5py reports some write errors as RuntimeError or ValueError).
    with writing(data_dir, errors=(Exception,)):
        hdf5_io.write_augmented(path_aug, data_aug, labels_aug, zs_aug, attrs=attrs)
        t6 = time.perf_counter()
        hdf5_io.write_patient_h5(path, data, labels, zs, attrs=attrs)
    t7 = time.perf_counter()
    t.update(boxes=t2 - t1, crop=t3 - t2, intensity=t4 - t3, augment=t5 - t4, write_aug=t6 - t5,
             write=t7 - t6, preprocess=t5 - t1, total=t7 - t0)
    return entry


def finished_entry(folder: str, pseudonym: str, params: Dict, data_dir: str) -> Optional[Dict]:
    """The manifest entry of a patient whose HDF5 files exist and match params and input; else None."""
    _, (path, path_aug) = h5_paths(data_dir, pseudonym)
    attrs = hdf5_io.read_attrs(path)
    if (attrs.get("params_hash"), attrs.get("input_hash")) != (params_hash(params), input_hash(folder)) \
            or "entry" not in attrs:
        return None
    entry = json.loads(attrs["entry"])
    if hdf5_io.augmented_files(path_aug) != hdf5_io.augmented_names(entry["slices"], paper.AUGMENTATIONS):
        return None
    return entry


def _work(job):
    """Pool worker: ('done'|'ok'|'bad'|'output', pseudonym, entry or reason, timings)."""
    folder, pid, params, data_dir = job
    try:
        with writing(data_dir):
            entry = finished_entry(folder, pid, params, data_dir)
        if entry is not None:
            return "done", pid, entry, {}
        timings = {}
        entry = process_patient(folder, pid, params, data_dir, timings)
        return "ok", pid, entry, timings
    except OutputError as e:
        return "output", pid, e.error, {}
    except BadInput as e:
        return "bad", pid, _scrub(str(e), folder), {}
    except MemoryError:
        raise
    except Exception as e:   # unexpected reader failure: still one line, still no input names
        return "bad", pid, _scrub("patient %s, file .: unexpected %s: %s" % (pid, type(e).__name__, e),
                                  folder), {}


# --- folds, lists, manifest ------------------------------------------------------------------------
def write_fold_lists(data_dir: str, fold_ids: List[List[str]], entries: Dict[str, Dict]) -> None:
    for k, val_ids in enumerate(fold_ids):
        fold_dir = os.path.join(data_dir, "fold%d" % k)
        train = [os.path.join(entries[p]["h5_aug"], name) for j, ids in enumerate(fold_ids) if j != k
                 for p in ids for name in hdf5_io.augmented_files(os.path.join(data_dir, entries[p]["h5_aug"]))]
        val = [entries[p]["h5"] for p in val_ids]
        rel = lambda p: os.path.relpath(os.path.join(data_dir, p), fold_dir)  # noqa: E731
        atomic.write_text(os.path.join(fold_dir, "train.txt"), "".join(rel(p) + "\n" for p in train))
        atomic.write_text(os.path.join(fold_dir, "val.txt"), "".join(rel(p) + "\n" for p in val))
    # Lists of a previous run with more folds would mislead: remove them.
    for name in os.listdir(data_dir):
        m = re.match(r"fold(\d+)$", name)
        if m and int(m.group(1)) >= len(fold_ids):
            for f in ("train.txt", "val.txt"):
                p = os.path.join(data_dir, name, f)
                if os.path.exists(p):
                    os.remove(p)
            try:
                os.rmdir(os.path.join(data_dir, name))
            except OSError:
                pass


def summarize(fold_ids, entries, skipped) -> Dict:
    rows = []
    for k, ids in enumerate(fold_ids):
        slices = sum(entries[p]["images"] for p in ids)
        train = sum(entries[p]["images_aug"] for j, o in enumerate(fold_ids) if j != k for p in o)
        rows.append({"fold": k, "patients": len(ids), "slices": slices, "val_images": slices,
                     "train_images": train})
    return {"folds": rows, "patients": sum(r["patients"] for r in rows),
            "slices": sum(r["slices"] for r in rows),
            "images_aug": sum(e["images_aug"] for e in entries.values()),
            "skipped": len(skipped)}


def format_summary(summary: Dict, skipped: List[Dict]) -> str:
    lines = ["%-6s %9s %8s %13s %11s" % ("fold", "patients", "slices", "train images", "val images")]
    for r in summary["folds"]:
        lines.append("%-6s %9d %8d %13d %11d" % ("fold%d" % r["fold"], r["patients"], r["slices"],
                                                r["train_images"], r["val_images"]))
    lines.append("%-6s %9d %8d %13s %11d" % ("total", summary["patients"], summary["slices"],
                                            "%d (8x)" % summary["images_aug"], summary["slices"]))
    if skipped:
        lines.append("skipped %d patient(s):" % len(skipped))
        lines += ["  %s: %s" % (s["id"], s["reason"]) for s in skipped]
    return "\n".join(lines)


# --- the tool --------------------------------------------------------------------------------------
def run(raw, data, n_folds=paper.N_FOLDS, seed=paper.SEED, jobs=1, roi=paper.ROI_REGEX, skip_bad=False,
        box=paper.DEFAULT_BOX_MODE, hu_window=paper.HU_WINDOW, progress=True, log=print,
        resize=paper.DEFAULT_RESIZE) -> Dict:
    """Run the whole pipeline; returns the manifest. Raises BadInput on the first bad patient unless
    skip_bad, OutputError when DATA cannot be written, SystemExit when another run holds DATA."""
    params = make_params(roi, box, hu_window, resize)
    names = list_patients(raw)
    hidden = sum(1 for n in os.listdir(raw) if n.startswith("."))
    if not names:
        raise SystemExit("make_data: no patient folders in RAW %s" % raw)
    key = pseudonyms(names)
    with data_lock(data):
        return _run_locked(raw, data, names, hidden, key, params, n_folds, seed, jobs, skip_bad, progress, log)


def _run_locked(raw, data, names, hidden, key, params, n_folds, seed, jobs, skip_bad, progress, log):
    from tqdm import tqdm
    with writing(data):
        os.makedirs(os.path.join(data, PATIENTS_DIR), exist_ok=True)
        remove_stale_temps(data)
        atomic.write_json(os.path.join(data, KEY_FILE),
                          {"note": "pseudonym -> input folder; keep apart from shared outputs",
                           "pseudonyms": {key[n]: n for n in names}})
    jobs_list = [(os.path.join(raw, n), key[n], params, data) for n in names]
    log("make_data: %d patient folder(s)%s, %d job(s)"
        % (len(names), " (%d hidden entries ignored)" % hidden if hidden else "", jobs))

    entries, skipped, n_done, stage = {}, [], 0, {}
    pool = multiprocessing.Pool(min(jobs, len(jobs_list))) if jobs > 1 and len(jobs_list) > 1 else None
    results = pool.imap_unordered(_work, jobs_list) if pool else map(_work, jobs_list)
    bar = tqdm(results, total=len(jobs_list), desc="make data", unit="patient", disable=not progress,
               file=sys.stderr)
    try:
        for status, pid, payload, timings in bar:
            if status == "output":
                raise OutputError(data, payload)
            if status == "bad":
                if not skip_bad:
                    raise BadInput(*_split_bad(payload, pid))
                skipped.append({"id": pid, "reason": payload})
                continue
            n_done += status == "done"
            entries[pid] = payload
            for k, v in timings.items():
                stage[k] = stage.get(k, 0.0) + v
    finally:
        bar.close()
        if pool:
            pool.terminate()
            pool.join()
            remove_stale_temps(data)   # workers killed mid-write by terminate()
    skipped.sort(key=lambda s: s["id"])
    ids = sorted(entries)
    if len(ids) < n_folds:
        raise SystemExit("make_data: %d usable patient(s) cannot fill %d folds" % (len(ids), n_folds))
    fold_ids = folds.assign_folds(ids, n_folds, seed)
    with writing(data):
        write_fold_lists(data, fold_ids, entries)
    summary = summarize(fold_ids, entries, skipped)
    manifest = {
        "params": dict(params, folds=n_folds, seed=seed, params_hash=params_hash(params)),
        "folds": fold_ids,
        "patients": [entries[p] for p in ids],
        "skipped": skipped,
        "summary": summary,
    }
    with writing(data):
        atomic.write_json(os.path.join(data, MANIFEST), manifest)
    log("make_data: %d patient(s) processed, %d already done, %d skipped" % (len(ids) - n_done, n_done,
                                                                            len(skipped)))
    if stage.get("total"):
        log("make_data: seconds spent (all workers): " + ", ".join(
            "%s %.2f" % (k, stage[k]) for k in ("read", "preprocess", "write_aug", "write", "total")
            if k in stage))
    log(format_summary(summary, skipped))
    return manifest


def _split_bad(line: str, pid: str):
    """Rebuild BadInput's (patient, file, message) from its one-line text."""
    m = re.match(r"patient (\S+), file (.*?): (.*)$", line)
    return (m.group(1), m.group(2), m.group(3)) if m else (pid, ".", line)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python3 -m data_prep.make_data",
        description="Cohort (one folder per patient: DICOM CT + RTSTRUCT/SEG, or NIfTI/NRRD image + mask) "
                    "-> tumor crops (SPEC §5) -> per-patient HDF5 files (plain and 8x augmented) and "
                    "patient folds for Caffe's HDF5Data layer. Patients are pseudonymised (P001, ...); "
                    "reruns skip finished patients.")
    ap.add_argument("--raw", required=True, help="cohort folder: one sub-folder per patient")
    ap.add_argument("--data", required=True, help="output folder (DATA layout: manifest.json, patients/, fold<k>/)")
    ap.add_argument("--folds", type=int, default=paper.N_FOLDS, help="number of folds (default %(default)s)")
    ap.add_argument("--seed", type=int, default=paper.SEED, help="fold shuffle seed (default %(default)s)")
    ap.add_argument("--jobs", type=int, default=1, help="parallel patients (default %(default)s)")
    ap.add_argument("--roi", default=paper.ROI_REGEX,
                    help="regex (case-insensitive) choosing the tumor ROI/segment (default %(default)r)")
    ap.add_argument("--skip-bad", action="store_true",
                    help="skip unusable patients (listed in manifest and summary) instead of stopping")
    ap.add_argument("--box", choices=paper.BOX_MODES, default=paper.DEFAULT_BOX_MODE,
                    help="one box per patient (SPEC default) or per slice (default %(default)s)")
    ap.add_argument("--hu-window", default=None, metavar="LO,HI",
                    help="HU window mapped to 0..255 (default %d,%d)" % paper.HU_WINDOW)
    ap.add_argument("--resize", choices=paper.RESIZE_MODES, default=paper.DEFAULT_RESIZE,
                    help="box -> 100x100: pixel-centre bilinear (default) or anti-aliased (filter widened with the "
                    "reduction, as PIL's resize; SPEC §7)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    argv = list(sys.argv[1:] if argv is None else argv)
    # `--hu-window -1000,400` (as the Makefile passes it) would read as an option: glue the value on.
    for i in range(len(argv) - 1):
        if argv[i] == "--hu-window":
            argv[i:i + 2] = ["--hu-window=" + argv[i + 1]]
            break
    args = ap.parse_args(argv)
    try:
        window = intensity.parse_window(args.hu_window) if args.hu_window else paper.HU_WINDOW
        re.compile(args.roi)
    except (ValueError, re.error) as e:
        ap.error(str(e))
    if args.folds < 1 or args.jobs < 1:
        ap.error("--folds and --jobs must be >= 1")
    try:
        run(args.raw, args.data, args.folds, args.seed, args.jobs, args.roi, args.skip_bad, args.box,
            window, progress=not args.no_progress, resize=args.resize)
    except BadInput as e:
        print("make_data: error: %s" % e, file=sys.stderr)
        print("make_data: stopped (SKIP_BAD=1 / --skip-bad skips such patients)", file=sys.stderr)
        return 2
    except OutputError as e:
        print("make_data: error: %s" % e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
