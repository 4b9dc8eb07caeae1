"""The phantom cohort on disk: N patients PHANTOM_000, ... under one folder, and their truth (`write_cohort`).

Each patient folder is written under a temporary name and renamed when complete; patients already done
with the same parameters are skipped. The hidden OUT/.truth/PHANTOM_000.npz holds the true mask (Z,Y,X),
slice positions, geometry and the SHA-256 of the HU volume; readers never look there, and `make data`
skips hidden folders. `main` is the CLI, `make phantoms` (python3 -m data_prep.phantoms).
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import time

import numpy as np

import atomic
import paper
from data_prep.phantoms.anatomy import DEFAULT_SIZE, KINDS, VERSION, make_patient, patient_name
from data_prep.phantoms.write import write_patient

TRUTH_DIR = ".truth"

def truth_path(out, index):
    return os.path.join(out, TRUTH_DIR, patient_name(index) + ".npz")


def load_truth(out, index):
    """The truth of phantom `index` under cohort folder `out`: a dict of arrays and scalars."""
    with np.load(truth_path(out, index), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def hu_digest(hu):
    """SHA-256 of an HU volume as C-ordered little-endian int16 (Z, Y, X): compare readers to truth."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(hu).astype("<i2")).tobytes()).hexdigest()


def _params(seed, index, size, kind=None):
    params = {"version": VERSION, "seed": int(seed), "index": int(index), "size": int(size)}
    if kind is not None:
        params["kind"] = kind
    return params


def _done(out, index, seed, size, kind=None):
    try:
        t = load_truth(out, index)
        return (json.loads(str(t["params"])) == _params(seed, index, size, kind) and
                os.path.isdir(os.path.join(out, patient_name(index))))
    except (OSError, KeyError, ValueError):
        return False


def _make_one(args):
    out, seed, index, size, force, truth_hu, kind = args
    name = patient_name(index)
    if not force and _done(out, index, seed, size, kind):
        return json.loads(str(load_truth(out, index)["summary"]))
    t0 = time.time()
    p = make_patient(seed, index, kind=kind, size=size)
    final = os.path.join(out, name)
    tmp = os.path.join(out, ".%s.tmp%d" % (name, os.getpid()))
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    try:
        files = write_patient(tmp, p)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    m = p["mask"].astype(bool)
    ks = np.nonzero(m.any(axis=(1, 2)))[0]
    rows = np.nonzero(m.any(axis=(0, 2)))[0]
    cols = np.nonzero(m.any(axis=(0, 1)))[0]
    dz, ps, _ = p["spacing"]
    summary = {"name": name, "kind": p["kind"], "files": len(files), "slices": int(m.shape[0]),
               "tumor_slices": [int(ks[0]), int(ks[-1])],
               "tumor_extent_mm": round(float(max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1) * ps), 1),
               "spacing": [dz, ps, ps], "rois": p["rois"] if p["kind"] == "rtstruct" else [],
               "tumor": p["tumor"], "seconds": round(time.time() - t0, 2)}
    arrays = {"mask": p["mask"], "positions": p["positions"], "spacing": np.array(p["spacing"]),
              "origin": np.array(p["origin"]), "affine": p["affine"], "kind": np.array(p["kind"]),
              "hu_sha256": np.array(hu_digest(p["hu"])), "hu_mid": p["hu"][ks[len(ks) // 2]],
              "params": np.array(json.dumps(_params(seed, index, size, kind))),
              "summary": np.array(json.dumps(summary))}
    if truth_hu:
        arrays["hu"] = p["hu"]
    with atomic.atomic_path(truth_path(out, index)) as tmpf:
        np.savez_compressed(tmpf, **arrays)
    return summary


def write_cohort(out, n=20, seed=paper.SEED, jobs=1, size=DEFAULT_SIZE, force=False, truth_hu=False,
                 progress=True, kind=None):
    """Write phantoms 0..n-1 under `out` (skipping those already done with the same parameters).

    kind None gives the cohort's format mix (anatomy.kind_for_index); one of KINDS writes every patient
    in that format (the same anatomy: the format draws no random numbers), e.g. "rtstruct" needs only
    pydicom.
    Returns the per-patient summaries (dicts) in index order; also writes out/.truth/cohort.json.
    """
    from tqdm import tqdm
    os.makedirs(os.path.join(out, TRUTH_DIR), exist_ok=True)
    for name in os.listdir(out):                       # folders left by an interrupted run
        if name.startswith(".PHANTOM_") and ".tmp" in name:
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    tasks = [(out, seed, i, size, force, truth_hu, kind) for i in range(n)]
    results = {}
    bar = tqdm(total=n, desc="phantoms", unit="patient", disable=not progress)
    if jobs > 1 and n > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(min(jobs, n)) as pool:
            for s in pool.imap_unordered(_make_one, tasks):
                results[s["name"]] = s
                bar.update(1)
    else:
        for t in tasks:
            s = _make_one(t)
            results[s["name"]] = s
            bar.update(1)
    bar.close()
    summaries = [results[patient_name(i)] for i in range(n)]
    atomic.write_json(os.path.join(out, TRUTH_DIR, "cohort.json"),
                      {"seed": seed, "n": n, "size": size, "version": VERSION, "patients": summaries})
    return summaries


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python3 -m data_prep.phantoms",
        description="Write the built-in phantom cohort: N chest-CT patients, each with one lung tumor, as "
                    "DICOM CT + RTSTRUCT (most), DICOM CT + DICOM-SEG (every 5th), NIfTI or NRRD pairs; "
                    "deterministic per seed. The true masks go to OUT/.truth/ (a hidden folder that "
                    "readers and `make data` ignore).")
    ap.add_argument("--out", required=True, help="output folder (one sub-folder per patient)")
    ap.add_argument("--n", type=int, default=20, help="number of patients (default 20)")
    ap.add_argument("--seed", type=int, default=paper.SEED, help="random seed (default %(default)s)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="parallel worker processes (default: CPU count)")
    ap.add_argument("--size", type=int, default=DEFAULT_SIZE,
                    help="in-plane pixels (default 512; the field of view stays the same)")
    ap.add_argument("--force", action="store_true", help="rewrite patients that are already done")
    ap.add_argument("--kind", choices=KINDS, help="write every patient in this format (default: the mix above)")
    ap.add_argument("--truth-hu", action="store_true",
                    help="also store the full HU volume in .truth/ (large); by default only its SHA-256")
    args = ap.parse_args(argv)
    if args.n < 1 or args.size < 32:
        ap.error("--n must be >= 1 and --size >= 32")
    t0 = time.time()
    summaries = write_cohort(args.out, args.n, args.seed, args.jobs, args.size, args.force, args.truth_hu,
                             kind=args.kind)
    kinds = {k: sum(s["kind"] == k for s in summaries) for k in KINDS}
    print("%d phantoms in %s (%s) in %.1f s" % (len(summaries), args.out,
          ", ".join("%s %d" % kv for kv in kinds.items() if kv[1]), time.time() - t0), file=sys.stderr)
    return 0
