"""Slurm as the engine of `make cv` and `make ablation` with SCHEDULER=slurm (job arrays; no scheduler of ours).

What runs stays with the tools. A schedulable tool (tools/cv.py, tools/ablation.py) answers four options:
  TOOL ARGS --plan           JSON on stdout: its tasks in a fixed order (name, run folder, done), the folders
                             tasks read and write, its GPU option, its tables, whether it has a prepare step
  TOOL ARGS --task I         task I exactly as the local path runs it (train + evaluate; a finished run is
                             skipped, an interrupted one resumes from its latest snapshot)
  TOOL ARGS --prepare-only   what every task needs first (ablation: its data), when the plan asks for it
  TOOL ARGS --summary-only   the tables and figures from the run folders, a missing run named in them

This module owns the rest, in two halves:
  submit (the host where you type make; Slurm's commands live there, Caffe's runtime may not): asks the tool
      for its plan through the runtime, skips finished tasks and tasks still queued or running from an
      earlier call, and submits one `sbatch` job array of the remaining tasks (array index = task index,
      so job 123_4 is always task 4), after a prepare job when the tool has one (afterok), then a summary
      job that depends on the array (afterany: it runs when a task fails, and names it). SLURM_ARGS go to
      every sbatch verbatim (split like a shell line, never evaluated). Records every submission in
      OUT/slurm/jobs.json. With --wait it blocks until the summary job ends, like `sbatch --wait` (it polls
      squeue every 2 s: sbatch --wait's own back-off adds up to 30 s per wait), prints the tables and names
      each task that did not finish with its log; without, it prints the job ids and how to follow them.
  node (the batch script, on the compute node): runs one task through the runtime
      (tools/runtime/runtime.sh exec, or TSFCN_SLURM_EXEC's container command in front of it) with its log
      in its run folder (RUN/slurm-<array>_<index>.log), GPU= from Slurm's allocation (CUDA_VISIBLE_DEVICES,
      else SLURM_JOB_GPUS: the task gets the first allocated GPU, device 0 of CUDA_VISIBLE_DEVICES) and
      BLAS threads from its CPUs; forwards scancel's SIGTERM to the tool (train.py snapshots) and waits for it;
      then records the job id in RUN/run.json ("slurm_job_id").

Plain Python 3 standard library only: both halves run outside the Caffe runtime.

CLI: python3 -m tools.slurm submit [--slurm-args STR] [--wait] -- TOOL [ARGS...]
     python3 -m tools.slurm node SUBMISSION {task,prepare,summary}     (the batch script runs this)
Environment: TSFCN_SLURM_EXEC  command the runtime runs under on every host, e.g.
             "apptainer exec --nv /shared/ts-fcn.sif" (the Docker image as a container; default: none,
             the runtime of `make env`, which needs root)
"""
import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import atomic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNTIME = os.path.join(REPO, "tools", "runtime", "runtime.sh")
ROLES = ("task", "prepare", "summary")
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
          "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"}
POLL_SECONDS = 2.0


def log(msg):
    print("[slurm] " + msg, flush=True)


def show(path):
    """A path as the user gave it: relative to the current folder when inside it, else absolute."""
    rel = os.path.relpath(path)
    return path if rel.startswith(os.pardir) else rel


# --- the runtime -------------------------------------------------------------------------------------
def runtime_argv(argv, exec_prefix=None):
    """argv run with the toolkit's environment: the runtime of `make env`, under a container command if any."""
    prefix = shlex.split(os.environ.get("TSFCN_SLURM_EXEC", "") if exec_prefix is None else exec_prefix)
    return prefix + [RUNTIME, "exec"] + list(argv)


def bind_env(paths, env=None):
    """env with TSFCN_BIND extended by paths (the runtime bind-mounts them: DATA and RUNS outside the checkout)."""
    env = dict(os.environ if env is None else env)
    env["TSFCN_BIND"] = ":".join([p for p in paths] + [p for p in env.get("TSFCN_BIND", "").split(":") if p])
    return env


def get_plan(tool_argv, exec_prefix=None):
    """The tool's --plan (run through the runtime on this host)."""
    r = subprocess.run(runtime_argv(["python3"] + tool_argv + ["--plan"], exec_prefix), stdout=subprocess.PIPE,
                       universal_newlines=True, cwd=os.getcwd())
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    if r.returncode != 0 or not lines:
        tool = tool_argv[1] if tool_argv[:1] == ["-m"] else " ".join(tool_argv[:1])
        raise SystemExit("error: %s --plan failed (exit %d)" % (tool, r.returncode))
    return json.loads(lines[-1])


# --- Slurm's commands ----------------------------------------------------------------------------------
def slurm_command(name):
    path = shutil.which(name)
    if path is None:
        raise SystemExit("error: SCHEDULER=slurm needs Slurm's `%s` on this machine (the submit host of your "
                         "cluster); not found in PATH" % name)
    return path


def sbatch(options, script, args, slurm_args):
    """Submit; the job id. Our options first, SLURM_ARGS after them (they win where both set one)."""
    cmd = [slurm_command("sbatch"), "--parsable"] + options + list(slurm_args) + [script] + list(args)
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    if r.returncode != 0:
        raise SystemExit("error: sbatch failed (exit %d): %s\n  command: %s"
                         % (r.returncode, r.stderr.strip(), " ".join(shlex.quote(c) for c in cmd)))
    return r.stdout.strip().split(";")[0]


def job_states(job_id, all_states=False):
    """{job or array task id ('123' or '123_4'): state} from squeue ({} once Slurm has forgotten the job)."""
    cmd = [slurm_command("squeue"), "-h", "-r", "-j", str(job_id), "-o", "%i|%T"] + (["-t", "all"] if all_states else [])
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    states = {}
    for line in r.stdout.splitlines() if r.returncode == 0 else []:
        jid, _, state = line.strip().partition("|")
        if jid:
            states[jid] = state.split()[0] if state else ""
    return states


def wait_for(job_id, poll=POLL_SECONDS):
    """Block until job_id has left the queue (sbatch --wait's semantics); its last state seen ('' if none)."""
    last = ""
    while True:
        states = job_states(job_id, all_states=True)
        state = states.get(str(job_id), "")
        if state:
            last = state
        if not state or state not in ACTIVE:
            return last
        time.sleep(poll)


# --- submit --------------------------------------------------------------------------------------------
def array_spec(indices):
    """sbatch --array value: '0-2,5' from [0, 1, 2, 5]."""
    parts, run = [], []
    for i in sorted(indices):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            parts.append(str(run[0]) if len(run) == 1 else "%d-%d" % (run[0], run[-1]))
        run = [i]
    if run:
        parts.append(str(run[0]) if len(run) == 1 else "%d-%d" % (run[0], run[-1]))
    return ",".join(parts)


def active_tasks(history):
    """{task index: array task id} of earlier submissions still queued or running; [active array job ids]."""
    active, arrays = {}, []
    for sub in history:
        if not sub.get("array"):
            continue
        states = job_states(sub["array"])
        for jid, state in states.items():
            base, _, index = jid.partition("_")
            if index.isdigit() and state in ACTIVE:
                active[int(index)] = jid
        if any(s in ACTIVE for s in states.values()):
            arrays.append(sub["array"])
    return active, arrays


def batch_script(folder):
    """OUT/slurm/job.sh: the batch script every job of a submission runs (tools/slurm.py node ...)."""
    path = os.path.join(folder, "job.sh")
    atomic.write_text(path, "#!/bin/bash\n# A TS-FCN Slurm job, written by tools/slurm.py: one task, the prepare "
                      "step or the summary of a submission,\n# run through the Caffe runtime on this node.\n"
                      "cd %s && exec python3 -m tools.slurm node \"$@\"\n" % shlex.quote(REPO))
    os.chmod(path, 0o755)
    return path


def follow_hint(out, job_ids, plan, todo, array):
    logs = [os.path.join(plan["tasks"][i]["run"], "slurm-%s_%d.log" % (array, i)) for i in todo[:1]]
    lines = ["follow:   squeue -j %s" % ",".join(job_ids),
             "          sacct -j %s   (where the cluster keeps accounting)" % ",".join(job_ids)]
    if logs:
        lines.append("          tail -f %s   (each task's log is in its run folder)" % show(logs[0]))
    lines.append("tables:   %s, once the summary job has run" % ", ".join(show(t) for t in plan["tables"]))
    lines.append("rerun the same command after a failure or scancel: finished runs are skipped, interrupted "
                 "ones resume from their snapshot")
    return "\n".join(lines)


def submit(tool_argv, slurm_args, wait=False, exec_prefix=None):
    """Plan, skip what is done or still queued, submit [prepare ->] array -> summary; exit code."""
    slurm_command("sbatch")
    plan = get_plan(tool_argv, exec_prefix)
    out = plan["out"]
    folder = os.path.join(out, "slurm")
    os.makedirs(folder, exist_ok=True)
    jobs_path = os.path.join(folder, "jobs.json")
    history = json.load(open(jobs_path)) if os.path.exists(jobs_path) else []
    active, active_arrays = active_tasks(history)
    todo = []
    for i, t in enumerate(plan["tasks"]):
        if t["done"]:
            log("%s: done already (%s)" % (t["name"], show(t["run"])))
        elif i in active:
            log("%s: still queued or running as job %s; not submitted again" % (t["name"], active[i]))
        else:
            todo.append(i)
    stamp = time.strftime("%Y%m%d-%H%M%S") + "-%d" % os.getpid()
    sub_path = os.path.join(folder, "submit-%s.json" % stamp)
    atomic.write_json(sub_path, {"tool": tool_argv, "cwd": os.getcwd(), "plan": plan,
                                 "exec": shlex.split(os.environ.get("TSFCN_SLURM_EXEC", "")
                                                     if exec_prefix is None else exec_prefix)})
    script = batch_script(folder)
    name = "ts-fcn-%s" % plan["tool"]
    common = ["--chdir=%s" % os.getcwd()]
    record = {"submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "submission": os.path.basename(sub_path),
              "tasks": {str(i): plan["tasks"][i]["name"] for i in todo}, "slurm_args": list(slurm_args)}
    ids = []
    after = list(active_arrays)
    if todo:
        deps = []
        if plan.get("prepare"):
            record["prepare"] = sbatch(common + ["--job-name=%s-prepare" % name,
                                                 "--output=%s" % os.path.join(folder, "prepare-%j.log")],
                                       script, [sub_path, "prepare"], slurm_args)
            deps = ["--dependency=afterok:%s" % record["prepare"], "--kill-on-invalid-dep=yes"]
            ids.append(record["prepare"])
            log("prepare job %s (%s)" % (record["prepare"], show(os.path.join(
                folder, "prepare-%s.log" % record["prepare"]))))
        record["array"] = sbatch(common + deps + ["--job-name=%s" % name, "--array=%s" % array_spec(todo),
                                                  "--output=%s" % os.path.join(folder, "task-%A_%a.out")],
                                 script, [sub_path, "task"], slurm_args)
        ids.append(record["array"])
        after.append(record["array"])
        log("%d task%s submitted as job array %s: %s" % (len(todo), "" if len(todo) == 1 else "s", record["array"],
            ", ".join("%s -> %s_%d" % (plan["tasks"][i]["name"], record["array"], i) for i in todo)))
    elif not active:
        log("every task is done; the summary job only writes the tables")
    deps = ["--dependency=afterany:%s" % ":".join(after), "--kill-on-invalid-dep=no"] if after else []
    record["summary"] = sbatch(common + deps + ["--job-name=%s-summary" % name,
                                                "--output=%s" % os.path.join(folder, "summary-%j.log")],
                               script, [sub_path, "summary"], slurm_args)
    ids.append(record["summary"])
    log("summary job %s%s" % (record["summary"], " (after job%s %s)" % ("s" if len(after) > 1 else "",
                                                                          ", ".join(after)) if after else ""))
    atomic.write_json(jobs_path, history + [record])
    if not wait:
        print(follow_hint(out, ids, plan, todo, record.get("array")), flush=True)
        return 0
    log("waiting for the summary job %s (WAIT=1) ..." % record["summary"])
    try:
        state = wait_for(record["summary"])
    except KeyboardInterrupt:
        log("stopped waiting; the jobs go on")
        print(follow_hint(out, ids, plan, todo, record.get("array")), flush=True)
        return 130
    final = get_plan(tool_argv, exec_prefix)
    for table in final["tables"]:
        if os.path.exists(table):
            print(open(table).read(), flush=True)
    failed = [(i, t) for i, t in enumerate(final["tasks"]) if not t["done"]]
    for i, t in failed:
        job = "%s_%d" % (record["array"], i) if i in todo else active.get(i)
        log("%s did not finish (job %s); log: %s" % (t["name"], job, show(
            os.path.join(t["run"], "slurm-%s.log" % job)) if job else "-"))
    missing = [t for t in final["tables"] if not os.path.exists(t)]
    if state != "COMPLETED" or missing:
        log("the summary job %s ended %s; its log: %s" % (record["summary"], state or "(state unknown)",
                                                           show(os.path.join(
                                                               folder, "summary-%s.log" % record["summary"]))))
    print("tables: %s" % ", ".join(show(t) for t in final["tables"]), flush=True)
    return 1 if failed or missing or state != "COMPLETED" else 0


# --- node ----------------------------------------------------------------------------------------------
def allocated_gpus(env):
    """The GPUs Slurm gave this job: CUDA_VISIBLE_DEVICES (what CUDA will see), else SLURM_JOB_GPUS; '' if none."""
    for key in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS"):
        value = env.get(key, "").strip()
        if value and value != "NoDevFiles":
            return value
    return ""


def allocated_cpus(env):
    """CPUs per task: SLURM_CPUS_PER_TASK, else this node's share of the job (SLURM_JOB_CPUS_PER_NODE '4(x2)')."""
    for key in ("SLURM_CPUS_PER_TASK", "SLURM_JOB_CPUS_PER_NODE"):
        value = env.get(key, "").split("(")[0].split(",")[0].strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def node_env(env, bind, plan):
    """The environment and extra tool options of a job on its node: bound folders, GPU, BLAS threads."""
    env = bind_env(bind, env)
    extra = []
    gpus = allocated_gpus(env)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus       # the runtime passes it on: the task's GPU 0 is Slurm's first
        env["TSFCN_GPU"] = gpus                  # the runtime uses the CUDA build of Caffe
        extra = list(plan["gpu_args"])
    cpus = allocated_cpus(env)
    if cpus:
        for key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env.setdefault(key, str(cpus))
    return env, extra


def job_label(env, role):
    if role == "task":
        return "%s_%s" % (env["SLURM_ARRAY_JOB_ID"], env["SLURM_ARRAY_TASK_ID"])
    return env.get("SLURM_JOB_ID", "local")


def run_group(argv, env, cwd, log_file, grace=60.0):
    """Run argv in its own process group; SIGTERM/SIGINT (scancel) go on to the whole group and we wait for it
    to end (train.py snapshots first) before returning the exit code."""
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log_file, stderr=subprocess.STDOUT,
                            start_new_session=True)
    got = []

    def forward(signum, frame):
        got.append(signum)
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait()
        deadline = time.time() + grace
        while time.time() < deadline:           # the tool's children (train.py) may outlive it
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return code if not got or code else 128 + got[0]


def record_job(run, label):
    """Put the Slurm job id into RUN/run.json (tools/train.py writes it; absent when training never started)."""
    path = os.path.join(run, "run.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        info = json.load(f)
    info["slurm_job_id"] = label
    atomic.write_json(path, info)
    return True


def node(sub_path, role):
    with open(sub_path) as f:
        sub = json.load(f)
    plan = sub["plan"]
    env = dict(os.environ)
    label = job_label(env, role)
    argv = ["python3"] + sub["tool"]
    if role == "task":
        index = int(env["SLURM_ARRAY_TASK_ID"])
        task = plan["tasks"][index]
        logdir, logname = task["run"], "slurm-%s.log" % label
        argv += ["--task", str(index)]
    else:
        task = None
        logdir, logname = os.path.join(plan["out"], "slurm"), "%s-%s.log" % (role, label)
        argv += ["--%s-only" % role]
    env, extra = node_env(env, plan["bind"], plan)
    if task is not None:
        argv += extra
    os.makedirs(logdir, exist_ok=True)
    log_path = os.path.join(logdir, logname)
    print("[slurm] job %s on %s: %s; log %s" % (label, os.uname().nodename, task["name"] if task else role,
                                               log_path), flush=True)
    with open(log_path, "a") as log_file:
        cmd = sub.get("exec", []) + [RUNTIME, "exec"] + argv
        log_file.write("[slurm] job %s on %s%s\n$ %s\n" % (label, os.uname().nodename,
                       ", GPU %s" % env["CUDA_VISIBLE_DEVICES"] if extra else "",
                       " ".join(shlex.quote(c) for c in cmd)))
        log_file.flush()
        code = run_group(cmd, env, sub["cwd"], log_file)
        if task is not None and record_job(task["run"], label):
            log_file.write("[slurm] job id %s recorded in %s\n" % (label, os.path.join(task["run"], "run.json")))
        log_file.write("[slurm] exit %d\n" % code)
    return code


def main(argv=None):
    ap = argparse.ArgumentParser(description="Slurm job arrays for make cv / make ablation (SCHEDULER=slurm): "
                                 "submit a tool's tasks, a summary job after them; or run one job on a node.")
    sub = ap.add_subparsers(dest="command")
    s = sub.add_parser("submit", help="submit TOOL's tasks as one job array, then its summary job")
    s.add_argument("--slurm-args", default="", help="sbatch options for every job, one string split like a "
                   "shell line, e.g. \"--partition=gpu --gres=gpu:1 --time=12:00:00\"")
    s.add_argument("--wait", action="store_true", help="block until the summary is written; print the tables")
    s.add_argument("tool", nargs=argparse.REMAINDER, help="-- -m tools.cv ARGS (or -m tools.ablation ARGS)")
    n = sub.add_parser("node", help="run one job of a submission (the batch script)")
    n.add_argument("submission")
    n.add_argument("role", choices=ROLES)
    a = ap.parse_args(argv)
    if a.command == "submit":
        tool = a.tool[1:] if a.tool[:1] == ["--"] else a.tool
        if not tool:
            ap.error("submit needs the tool and its arguments after --")
        return submit(tool, shlex.split(a.slurm_args), a.wait)
    if a.command == "node":
        return node(a.submission, a.role)
    ap.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
