"""`make fetch`: a public cohort from the NCI Imaging Data Commons (IDC) into the folders `make data` reads.

    python3 -m data_prep.fetch --cohort nsclc-radiomics --out raw/nsclc [--n 3 [--seed S] | --patients ID,ID]

Owns the download, from the plan (data_prep/idc_plan.py) to complete patient folders:

1. Plans from the IDC index that ships in the idc-index-data wheel (offline): each patient's CT series
   and the RTSTRUCT drawn on it, sizes and instance counts from the index. Prints the plan and writes
   OUT/fetch_plan.json and OUT/LICENSE_AND_CITATION.txt (also printed) before anything is downloaded.
2. Downloads with s5cmd, the client idc-index drives, from IDC's public buckets (no account:
   --no-sign-request; `--endpoint-url` chooses the S3 server, the default is AWS), one manifest of
   `sync s3://<bucket>/<crdc_series_uuid>/* <folder>` lines for everything missing, as idc-index
   lays out its manifests. A patient is staged in OUT/.fetch-partial/<PatientID>/ (hidden: `make data`
   ignores it) and renamed to OUT/<PatientID>/ only when complete: each series holds exactly the index's
   instanceCount of readable DICOM files of that series, and the RTSTRUCT references the CT. So a killed
   download resumes where it stopped (sync fetches only missing or different files), a rerun fetches
   only what is missing or incomplete, and an incomplete series is refused, never handed to `make data`.
   idc-index's own download_from_selection is not used: its endpoint is a module constant and it
   logs a failing s5cmd instead of raising, so it could neither be tested offline nor refuse a
   short series.

Layout: OUT/<PatientID>/CT_<SeriesInstanceUID>/<crdc_instance_uuid>.dcm and
OUT/<PatientID>/RTSTRUCT_<SeriesInstanceUID>/…, i.e. one folder per patient as `make data` expects.
The folders keep IDC's PatientIDs (the collection's own pseudonyms): pseudonymisation is `make
data`'s job, and the fetched folder is the user's source data.

The index, duckdb and s5cmd are optional packages installed on first use (data_prep/extra_deps.py);
the tool then runs again in a child Python that sees them.
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse

import atomic
from data_prep import extra_deps, idc_plan

DEFAULT_ENDPOINT = "https://s3.amazonaws.com"     # idc-index's aws_endpoint_url
PLAN_FILE = "fetch_plan.json"
LICENCE_FILE = "LICENSE_AND_CITATION.txt"
STAGING = ".fetch-partial"
ACTIVE = "TSFCN_FETCH_DEPS"                        # set in the child that sees the optional packages


class FetchError(RuntimeError):
    pass


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# --- plan ------------------------------------------------------------------------------------------

def index_source(path):
    """(index file, label) -- the wheel's parquet unless `path` is given."""
    if path:
        return path, "index file %s" % os.path.basename(path)
    import idc_index_data
    version = idc_index_data.__version__
    return str(idc_index_data.IDC_INDEX_PARQUET_FILEPATH), \
        "IDC data release v%s, idc-index-data %s" % (version.split(".")[0], version)


def build_plan(args):
    import duckdb
    index, label = index_source(args.index)
    con = duckdb.connect()
    series = idc_plan.load_series(con, index, args.cohort)
    return idc_plan.make_plan(series, args.cohort, label, n=args.n, seed=args.seed, patients=args.patients)


def print_plan(plan, out=sys.stdout):
    ps = plan["patients"]
    print("fetch: %s (collection %s, %s): %d patients, %d CT + %d RTSTRUCT series, %.2f GB"
          % (plan["cohort"], plan["collection_id"], plan["index"], len(ps), len(ps), len(ps), plan["MB"] / 1000),
          file=out)
    row = "  %-16s %9s %8s %11s  %s"
    print(row % ("PatientID", "CT slices", "CT MB", "RTSTRUCT MB", "CT SeriesInstanceUID"), file=out)
    for e in ps:
        print(row % (e["PatientID"], e["CT"]["instances"], "%.2f" % e["CT"]["MB"], "%.2f" % e["RTSTRUCT"]["MB"],
                     e["CT"]["SeriesInstanceUID"]), file=out)
    if plan["not_plannable"]:
        print("  (%d patients of the collection have no plannable CT + RTSTRUCT pair: see %s)"
              % (len(plan["not_plannable"]), PLAN_FILE), file=out)
    out.flush()


# --- download ----------------------------------------------------------------------------------------

def series_folders(entry):
    return [("%s_%s" % (mod, entry[mod]["SeriesInstanceUID"]), entry[mod]) for mod in ("CT", "RTSTRUCT")]


def dicom_files(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith(".dcm")) if os.path.isdir(folder) else []


def looks_complete(patient_dir, entry):
    """Cheap check of a finished patient folder: every series holds the index's instance count."""
    return all(len(dicom_files(os.path.join(patient_dir, name))) == s["instances"] for name, s in series_folders(entry))


def check_reachable(endpoint, timeout=10.0):
    url = urllib.parse.urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise FetchError("cannot reach the IDC bucket endpoint %s (%s:%d): %s"
                         % (endpoint, url.hostname, port, e.strerror or e))


def verify_patient(stage, entry):
    """None if the staged patient is complete and consistent, else the reason (one line).

    Unreadable or foreign files are removed, so that the next run fetches them again."""
    import pydicom
    from data_prep.dicom_masks import referenced_series
    pid = entry["PatientID"]
    for name, s in series_folders(entry):
        folder = os.path.join(stage, name)
        for n in os.listdir(folder) if os.path.isdir(folder) else []:     # s5cmd's temporary files
            if not n.endswith(".dcm"):
                os.remove(os.path.join(folder, n))
        files, sops, bad = dicom_files(folder), set(), None
        for n in files:
            try:
                ds = pydicom.dcmread(os.path.join(folder, n), stop_before_pixels=True)
                ok = ds.SeriesInstanceUID == s["SeriesInstanceUID"]
            except Exception:
                ok = False
            if ok:
                sops.add(ds.SOPInstanceUID)
            else:
                bad = bad or n
                os.remove(os.path.join(folder, n))
        if bad:
            return "%s: %s/%s is not a readable instance of the planned series (removed; rerun to fetch it again)" \
                % (pid, name, bad)
        if len(sops) != s["instances"]:
            return ("%s: series %s is incomplete: %d of the %d instances the index lists (instanceCount); "
                    "refused, kept in %s/%s" % (pid, name, len(sops), s["instances"], STAGING, entry["folder"]))
        if name.startswith("RTSTRUCT_"):
            ds = pydicom.dcmread(os.path.join(folder, files[0]), stop_before_pixels=True)
            refs = referenced_series(ds)
            if entry["CT"]["SeriesInstanceUID"] not in refs:
                return "%s: %s/%s does not reference the planned CT series %s (it references %s)" \
                    % (pid, name, files[0], entry["CT"]["SeriesInstanceUID"], ", ".join(sorted(refs)) or "none")
    return None


def _dir_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for n in files:
            try:
                total += os.path.getsize(os.path.join(root, n))
            except OSError:
                pass
    return total


def run_s5cmd(s5cmd, endpoint, manifest_lines, cwd, total_bytes, jobs, progress=True):
    """Run one s5cmd manifest in `cwd` with a byte progress bar; returns (exit code, first ERROR line)."""
    from tqdm import tqdm
    with tempfile.NamedTemporaryFile("w", suffix=".s5cmd", delete=False) as f:
        f.write("\n".join(manifest_lines) + "\n")
        manifest = f.name
    err = tempfile.TemporaryFile("w+")
    cmd = [s5cmd, "--no-sign-request", "--endpoint-url", endpoint, "--numworkers", str(jobs), "run", manifest]
    env = dict(os.environ)
    if "SSL_CERT_FILE" not in env and os.path.exists(extra_deps.HOST_CA):
        env["SSL_CERT_FILE"] = extra_deps.HOST_CA      # the host's CA bundle, for a TLS-intercepting network
    start = _dir_bytes(cwd)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="fetch", file=sys.stderr,
                  disable=not progress) as bar:
            while proc.poll() is None:
                time.sleep(0.5)
                bar.n = min(max(_dir_bytes(cwd) - start, 0), total_bytes)
                bar.refresh()
            bar.n = min(max(_dir_bytes(cwd) - start, 0), total_bytes)
            bar.refresh()
    except BaseException:
        proc.terminate()
        proc.wait()
        raise
    finally:
        os.remove(manifest)
    err.seek(0)
    errors = [ln.strip() for ln in err.read().splitlines() if ln.startswith("ERROR")]
    return proc.returncode, (errors[0] if errors else None)


def download(plan, out, endpoint, jobs, progress=True):
    """Fetch every planned patient not yet complete in `out`; returns the list of refusal lines."""
    stage_root = os.path.join(out, STAGING)
    todo = [e for e in plan["patients"] if not (os.path.isdir(os.path.join(out, e["folder"])) and
                                                looks_complete(os.path.join(out, e["folder"]), e))]
    done = len(plan["patients"]) - len(todo)
    if not todo:
        print("fetch: all %d patients already complete in %s" % (done, out), flush=True)
        return []
    need_mb = sum(e["MB"] for e in todo)
    have = _dir_bytes(stage_root)
    free = shutil.disk_usage(out).free
    if free < need_mb * 1e6 - have:
        raise FetchError("%s has %.2f GB free, the download needs %.2f GB" % (out, free / 1e9, need_mb / 1e3))
    print("fetch: %d patients to download (%.2f GB), %d already complete" % (len(todo), need_mb / 1000, done),
          flush=True)
    check_reachable(endpoint)
    for e in todo:
        final = os.path.join(out, e["folder"])
        if os.path.isdir(final):
            # Changed since it was fetched (a file deleted, say): back to staging, fetch what is missing.
            os.makedirs(stage_root, exist_ok=True)
            if os.path.exists(os.path.join(stage_root, e["folder"])):
                shutil.rmtree(os.path.join(stage_root, e["folder"]))
            os.replace(final, os.path.join(stage_root, e["folder"]))
    s5cmd = extra_deps.s5cmd_binary(os.environ[ACTIVE])
    lines = []
    for e in todo:
        for name, s in series_folders(e):
            os.makedirs(os.path.join(stage_root, e["folder"], name), exist_ok=True)
            # relative, safe destination: no quoting questions whatever OUT is called
            lines.append("sync s3://%s/%s/* %s/%s/" % (s["bucket"], s["crdc_series_uuid"], e["folder"], name))
    rc, first_error = run_s5cmd(s5cmd, endpoint, lines, stage_root, int(need_mb * 1e6) - have, jobs, progress)
    refused = []
    for e in todo:
        reason = verify_patient(os.path.join(stage_root, e["folder"]), e)
        if reason:
            refused.append(reason + ("" if not first_error else "; s5cmd: " + first_error))
        else:
            os.replace(os.path.join(stage_root, e["folder"]), os.path.join(out, e["folder"]))
    if not os.listdir(stage_root):
        os.rmdir(stage_root)
    if rc != 0 and not refused:
        refused.append("s5cmd exited with %d: %s" % (rc, first_error or "no error message"))
    return refused


# --- command line --------------------------------------------------------------------------------------

def write_if_changed(path, text):
    """Atomic write, skipped when the file already holds `text` (a rerun leaves OUT untouched)."""
    try:
        with open(path) as f:
            if f.read() == text:
                return
    except OSError:
        pass
    atomic.write_text(path, text)


def parse_patients(text):
    if not text:
        return None
    if text.startswith("@"):
        with open(text[1:]) as f:
            text = f.read()
    ids = [p.strip() for p in text.replace(",", "\n").splitlines() if p.strip()]
    return ids or None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(
        prog="python3 -m data_prep.fetch",
        description="Fetch a public cohort from the NCI Imaging Data Commons: for each patient the CT series "
                    "and the RTSTRUCT drawn on it, into OUT/<PatientID>/ as `make data` reads it. Prints and "
                    "writes the plan (OUT/%s) and the licence and citation text (OUT/%s) first; resumable and "
                    "idempotent." % (PLAN_FILE, LICENCE_FILE))
    ap.add_argument("--cohort", required=True, help="IDC collection, e.g. nsclc-radiomics")
    ap.add_argument("--out", required=True, help="output folder (one sub-folder per patient)")
    ap.add_argument("--n", type=int, help="the first N patients in PatientID order (default: all)")
    ap.add_argument("--seed", type=int, help="with --n: a random sample of N patients drawn with this seed")
    ap.add_argument("--patients", help="comma-separated PatientIDs, or @file with one per line")
    ap.add_argument("--plan-only", action="store_true", help="print and write the plan, download nothing")
    ap.add_argument("--endpoint-url", default=DEFAULT_ENDPOINT,
                    help="S3 endpoint of the buckets (default %(default)s; any S3-compatible mirror)")
    ap.add_argument("--jobs", type=int, default=64, help="parallel s5cmd transfers (default %(default)s)")
    ap.add_argument("--index", help="index file to plan from (parquet or csv with idc_index's columns; "
                                    "default: the one in the idc-index-data wheel)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.seed is not None and args.n is None:
        ap.error("--seed draws a sample of --n patients: give --n too")
    if args.patients and args.n is not None:
        ap.error("give either --patients or --n, not both")
    args.patients = parse_patients(args.patients)

    if os.environ.get(ACTIVE) is None:
        try:
            deps = extra_deps.ensure("fetch")
        except extra_deps.InstallError as e:
            sys.exit("fetch: %s" % e)
        env = extra_deps.env_with(deps)
        env[ACTIVE] = deps
        os.execve(sys.executable, [sys.executable, "-m", "data_prep.fetch"] + argv, env)

    try:
        plan = build_plan(args)
        print_plan(plan)
        os.makedirs(args.out, exist_ok=True)
        write_if_changed(os.path.join(args.out, PLAN_FILE), json.dumps(plan, indent=1) + "\n")
        text = idc_plan.licence_text(plan)
        write_if_changed(os.path.join(args.out, LICENCE_FILE), text)
        print("\n" + text, flush=True)
        if args.plan_only:
            print("fetch: plan only; %s written" % os.path.join(args.out, PLAN_FILE))
            return 0
        refused = download(plan, args.out, args.endpoint_url, args.jobs, progress=not args.no_progress)
    except (idc_plan.PlanError, FetchError, extra_deps.InstallError) as e:
        sys.exit("fetch: %s" % e)
    except KeyboardInterrupt:
        sys.exit("fetch: interrupted; run the same command again to resume")
    for line in refused:
        log("fetch: " + line)
    complete = sum(os.path.isdir(os.path.join(args.out, e["folder"])) for e in plan["patients"])
    print("fetch: %d of %d patients complete in %s" % (complete, len(plan["patients"]), args.out), flush=True)
    if refused:
        sys.exit("fetch: %d patients incomplete; run the same command again to resume" % len(refused))
    return 0


if __name__ == "__main__":
    sys.exit(main())
