"""`make cv` / `make ablation` with SCHEDULER=slurm against a real one-node Slurm cluster on this machine
(tests/slurm_cluster.py: munged, slurmctld, slurmd, 2 CPUs): job arrays with every run and the summary as a
local run writes them, a cancelled task resubmitted alone, an interrupted run resumed, seeds, SLURM_ARGS
verbatim; and the node-side rules (GPU= and threads from Slurm's allocation).

Slurm's daemons and commands are programs of the host, so this file runs there, with the standard library and
pytest (`make test` runs it after the suite in the runtime, through tests/run-on-host.sh); the Caffe work runs
in the runtime as everywhere else. Six 256x256 phantoms, three folds, two iterations, narrow fc6/fc7.
"""
import json
import os
import re
import subprocess

import pytest

import slurm_cluster
from tools import slurm

if os.path.exists("/.ts-fcn-rootfs"):
    pytest.skip("Slurm runs on the host, not inside the Caffe runtime: `make test` runs this file there next "
                "(tests/run-on-host.sh)", allow_module_level=True)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNTIME = os.path.join(REPO, "tools", "runtime", "runtime.sh")
TRAIN_ARGS = "--max-iter 2 --fc-channels 16 --quiet"
TIMEOUT = 1800          # seconds per make call: about one on CI's idle 2 cores; far more on a loaded machine


# --- node-side rules (no cluster needed) ------------------------------------------------------------------
def test_array_spec():
    assert slurm.array_spec([5]) == "5"
    assert slurm.array_spec([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


def test_gpu_and_threads_from_the_allocation():
    plan = {"gpu_args": ["--gpus", "0"]}
    env, extra = slurm.node_env({"CUDA_VISIBLE_DEVICES": "2", "SLURM_JOB_GPUS": "2", "SLURM_CPUS_PER_TASK": "4"},
                                ["/data"], plan)
    assert extra == ["--gpus", "0"]                         # the first GPU Slurm gave the task ...
    assert env["CUDA_VISIBLE_DEVICES"] == "2" and env["TSFCN_GPU"] == "2"    # ... which is CUDA's device 0
    assert env["OMP_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == "4"
    assert env["TSFCN_BIND"] == "/data"
    env, extra = slurm.node_env({"SLURM_JOB_GPUS": "1,3", "SLURM_JOB_CPUS_PER_NODE": "8(x2)"}, [], plan)
    assert env["CUDA_VISIBLE_DEVICES"] == "1,3" and extra == ["--gpus", "0"] and env["OMP_NUM_THREADS"] == "8"
    env, extra = slurm.node_env({"CUDA_VISIBLE_DEVICES": "NoDevFiles", "OMP_NUM_THREADS": "1",
                                 "SLURM_CPUS_PER_TASK": "2"}, [], plan)
    assert extra == [] and "TSFCN_GPU" not in env and env["OMP_NUM_THREADS"] == "1"   # CPU task; user's value kept


def test_runtime_passes_cuda_visible_devices():
    """GPU 0 inside the runtime is Slurm's first GPU only if CUDA_VISIBLE_DEVICES reaches the tools."""
    r = subprocess.run([RUNTIME, "exec", "python3", "-c", "import os; print(os.environ.get('CUDA_VISIBLE_DEVICES'))"],
                       env=dict(os.environ, CUDA_VISIBLE_DEVICES="3"), stdout=subprocess.PIPE, universal_newlines=True)
    assert r.returncode == 0 and r.stdout.split()[-1] == "3"


# --- a real cluster ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = slurm_cluster.missing_programs()
    if missing:
        pytest.skip("Slurm is not installed on this machine (%s not found; Debian: apt-get install slurm-wlm munge)"
                    % ", ".join(missing))
    if os.geteuid() != 0:
        pytest.skip("the one-node test cluster's slurmd has to run as root")
    c = slurm_cluster.Cluster(str(tmp_path_factory.mktemp("slurm")), cpus=2).start()
    yield c
    c.stop()


def runtime(*argv, codes=(0,)):
    r = subprocess.run([RUNTIME, "exec"] + list(argv), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       universal_newlines=True, timeout=TIMEOUT)
    assert r.returncode in codes, r.stdout[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Six small phantom patients (256x256) and their HDF5 data in three folds (data) and in two (data2)."""
    root = tmp_path_factory.mktemp("cohort")
    raw = str(root / "raw")
    runtime("python3", "-c", "from data_prep import phantoms, make_data; "
            "phantoms.write_cohort(%r, n=6, seed=0, jobs=1, size=256, progress=False); "
            "make_data.run(%r, %r, n_folds=3, seed=0, jobs=1); make_data.run(%r, %r, n_folds=2, seed=0, jobs=1)"
            % (raw, raw, str(root / "data"), raw, str(root / "data2")))
    return root


def make(cluster, *args):
    env = {k: v for k, v in cluster.env.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    r = subprocess.run(["make", "--no-print-directory"] + list(args), cwd=REPO, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, universal_newlines=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout[-5000:]
    return r.stdout


def read_json(path):
    with open(str(path)) as f:
        return json.load(f)


def test_cv_job_array_waits_and_writes_what_a_local_run_writes(cluster, cohort):
    data, runs = cohort / "data", cohort / "cv"
    # Fold 2 was interrupted (as Ctrl-C or a scancel leaves it): its task must resume, not start over.
    runtime("python3", "-m", "tools.train", "--fold", "2", "--data", str(data), "--run", str(runs / "fold2"),
            "--profile", "fast", "--stop-after", "1", *TRAIN_ARGS.split(), codes=(130,))
    assert (runs / "fold2" / "snapshots" / "ts_fcn_iter_1.solverstate").exists()

    out = make(cluster, "cv", "SCHEDULER=slurm", "WAIT=1", "DATA=%s" % data, "RUNS=%s" % runs, "FOLDS=3",
               "PROFILE=fast", "TRAIN_ARGS=" + TRAIN_ARGS)
    array = re.search(r"3 tasks submitted as job array (\d+)", out).group(1)
    assert all(s == "COMPLETED" for s in cluster.state(array).values())
    for k in range(3):
        run = runs / ("fold%d" % k)
        m = read_json(run / "metrics.json")
        assert m["iterations"] == 2 and m["profile"] == "fast"
        assert m["caffe_test"]["iterations"] == m["slices"]              # the local path's evaluation ran
        assert read_json(run / "run.json")["slurm_job_id"] == "%s_%d" % (array, k)
        log = (run / ("slurm-%s_%d.log" % (array, k))).read_text()
        assert "fold %d: done" % k in log and "--task %d" % k in log and "[slurm] exit 0" in log
    assert "resumed from snapshots/ts_fcn_iter_1.solverstate" in (runs / "fold2" / "cv.log").read_text()
    table = read_json(runs / "cv.json")
    assert [r["fold"] for r in table["folds"]] == [0, 1, 2] and table["patients"] == 6
    assert not any(r.get("missing") for r in table["folds"])
    md = (runs / "cv.md").read_text()
    assert md in out                                                     # WAIT=1 printed the table
    for png in ("cv_dice.png", "cv_dice_vs_volume.png"):
        assert (runs / png).stat().st_size > 10000
    # The summary job wrote what the local path writes: a local run finds every fold done, same files.
    local = runtime("python3", "-m", "tools.cv", "--data", str(data), "--runs", str(runs), "--folds", "3",
                    "--profile", "fast")
    assert local.count("done already") == 3
    assert (runs / "cv.md").read_text() == md and read_json(runs / "cv.json") == table


def test_cv_seeds_cancelled_task_is_the_only_one_resubmitted(cluster, cohort):
    """SEEDS=0,1 on two folds: four tasks (seed s fold k is index 2s + k); the last, pending while two tasks hold
    the node's two CPUs, is cancelled, named in the tables, and the only one the next call submits."""
    data, runs = cohort / "data2", cohort / "cv_seeds"
    args = ["cv", "SCHEDULER=slurm", "SEEDS=0,1", "DATA=%s" % data, "RUNS=%s" % runs, "FOLDS=2", "PROFILE=fast",
            "TRAIN_ARGS=" + TRAIN_ARGS]
    out = make(cluster, *args)                                           # no WAIT: submits and returns
    array = re.search(r"4 tasks submitted as job array (\d+)", out).group(1)
    assert "seed 1 fold 1 -> %s_3" % array in out and "squeue -j" in out and "tail -f" in out
    assert cluster.state(array)["%s_3" % array] == "PENDING"
    cluster.run("scancel", "%s_3" % array)
    cluster.wait_idle()
    states = cluster.state(array)              # a task cancelled while pending leaves no record of its own
    assert states.pop("%s_3" % array, "CANCELLED") == "CANCELLED" and set(states.values()) == {"COMPLETED"}
    assert not (runs / "seed1" / "fold1" / "metrics.json").exists()
    assert "| 1 | – | missing | – |" in (runs / "seed1" / "cv.md").read_text()    # named, not hidden
    assert read_json(runs / "cv_seeds.json")["folds"][1]["per_seed"]["1"] is None
    runs_of = [(s, k) for s in (0, 1) for k in range(2)]
    first = {sk: read_json(runs / ("seed%d" % sk[0]) / ("fold%d" % sk[1]) / "run.json").get("slurm_job_id")
             for sk in runs_of[:3]}
    assert first == {sk: "%s_%d" % (array, i) for i, sk in enumerate(runs_of[:3])}

    out = make(cluster, *args, "WAIT=1")
    assert out.count("done already") == 3
    again = re.search(r"1 task submitted as job array (\d+): seed 1 fold 1 -> \d+_3\n", out).group(1)
    for i, (s, k) in enumerate(runs_of):
        run = runs / ("seed%d" % s) / ("fold%d" % k)
        assert read_json(run / "run.json")["slurm_job_id"] == ("%s_3" % again if i == 3 else first[(s, k)])
        assert read_json(run / "run.json")["seed"] == s                  # train.py --seed s
    t = read_json(runs / "cv_seeds.json")
    seed_tables = [read_json(runs / ("seed%d" % s) / "cv.json") for s in (0, 1)]
    means = [st["mean_over_folds"] for st in seed_tables]
    assert t["runs"] == 4 and t["mean_over_seeds"] == pytest.approx(sum(means) / 2)
    assert t["sd_over_seeds"] == pytest.approx(abs(means[0] - means[1]) / 2 ** 0.5)
    assert (runs / "cv_seeds.md").read_text() in out and "over folds" in out


def test_ablation_job_array_with_verbatim_slurm_args(cluster, cohort):
    out_dir = cohort / "ablation"
    comment = 'tsfcn "a b" $HOME `id` $(id)'                # reaches sbatch as typed: no make or shell expansion
    out = make(cluster, "ablation", "SCHEDULER=slurm", "WAIT=1", "RAW=%s" % (cohort / "raw"), "OUT=%s" % out_dir,
               "TRAIN_ARGS=" + TRAIN_ARGS, "SLURM_ARGS=--comment='%s'" % comment)
    array = re.search(r"6 tasks submitted as job array (\d+)", out).group(1)
    prepare = re.search(r"prepare job (\d+)", out).group(1)
    comments = cluster.run("squeue", "-h", "-t", "all", "-j", "%s,%s" % (prepare, array), "-o", "%k").splitlines()
    assert comments and set(comments) == {comment}
    result = read_json(out_dir / "ablation.json")
    names = [r["variant"] for r in result["variants"]]
    assert names == ["baseline", "crop", "box", "loss", "resize", "weights"]
    assert all(r["iterations"] == 2 and not r.get("missing") for r in result["variants"])
    for i, name in enumerate(names):
        assert read_json(out_dir / name / "run.json")["slurm_job_id"] == "%s_%d" % (array, i)
        assert (out_dir / name / ("slurm-%s_%d.log" % (array, i))).exists()
    assert read_json(out_dir / "box" / "run.json")["data"].endswith("data_box-slice")
    assert read_json(out_dir / "resize" / "run.json")["data"].endswith("data_resize-antialias")
    md = (out_dir / "ablation.md").read_text()
    assert md in out and "| weights | class weights 0.5/0.5 |" in md
    assert (out_dir / "ablation_dice.png").stat().st_size > 10000
    assert (out_dir / "slurm" / ("prepare-%s.log" % prepare)).exists()
