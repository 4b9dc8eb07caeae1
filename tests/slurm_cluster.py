"""Test helper: a real one-node Slurm cluster on localhost, private to one test session.

Debian's `munge` and `slurm-wlm` (slurmctld, slurmd, the client commands): munged with its own key and
socket, slurmctld and slurmd with their own slurm.conf (2 CPUs, free ports, no accounting), state, spool and
logs, all under one folder. Clients find it through SLURM_CONF (`env`). `stop()` ends the three daemons it
started (by their pid files) and nothing else. Runs on the host as root (slurmd starts jobs as their users).
"""
import os
import shutil
import signal
import socket
import subprocess
import time

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")


def missing_programs():
    return [p for p in DAEMONS if shutil.which(p) is None and not os.path.exists(os.path.join("/usr/sbin", p))]


def _program(name):
    return shutil.which(name) or os.path.join("/usr/sbin", name)


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


CONF = """ClusterName=tsfcn-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
PlugStackConfig={root}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=3600
KillWait=30
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    def __init__(self, root, cpus=2):
        self.root = os.path.abspath(root)
        self.cpus = cpus
        self.conf = os.path.join(self.root, "slurm.conf")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        self.pidfiles = [os.path.join(self.root, p) for p in ("slurmd.pid", "slurmctld.pid", "munge/munged.pid")]

    def logs(self):
        """The last lines of the daemons' logs (for a failure message)."""
        text = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log"):
            path = os.path.join(self.root, "log", name)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    text.append("== %s\n%s" % (name, "".join(f.readlines()[-15:])))
        return "\n".join(text)

    def start(self, timeout=60):
        for d in ("state", "spool", "log", "munge"):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        os.chmod(self.root, 0o755)
        os.chmod(os.path.join(self.root, "munge"), 0o755)
        key = os.path.join(self.root, "munge", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        ctld_port, slurmd_port = _free_ports(2)
        host = socket.gethostname().split(".")[0]
        with open(self.conf, "w") as f:
            f.write(CONF.format(host=host, root=self.root, ctld_port=ctld_port, slurmd_port=slurmd_port,
                                cpus=self.cpus))
        open(os.path.join(self.root, "plugstack.conf"), "w").close()
        m = self.root + "/munge/"
        self._daemon([_program("munged"), "--force", "--socket=%smunge.socket" % m, "--key-file=%smunge.key" % m,
                      "--pid-file=%smunged.pid" % m, "--seed-file=%smunged.seed" % m,
                      "--log-file=%s/log/munged.log" % self.root])
        self._daemon([_program("slurmctld"), "-i"])       # -i: ignore state from any earlier run
        self._daemon([_program("slurmd")])
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, universal_newlines=True)
            if r.returncode == 0 and r.stdout.strip() == "idle":
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError("the Slurm test cluster did not come up within %d s:\n%s" % (timeout, self.logs()))

    def _daemon(self, argv):
        r = subprocess.run(argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           universal_newlines=True, timeout=60)
        if r.returncode != 0:
            self.stop()
            raise RuntimeError("%s failed (exit %d): %s\n%s" % (argv[0], r.returncode, r.stdout, self.logs()))

    def stop(self):
        """SIGTERM the daemons this cluster started (slurmd, slurmctld, munged), then wait for them."""
        pids = []
        for path in self.pidfiles:
            try:
                with open(path) as f:
                    pid = int(f.read().strip())
                os.kill(pid, signal.SIGTERM)
                pids.append(pid)
            except (OSError, ValueError):
                pass
        deadline = time.time() + 30
        for pid in pids:
            while time.time() < deadline:
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.2)

    def run(self, *argv):
        """A Slurm client command against this cluster; its stdout."""
        r = subprocess.run(list(argv), env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True)
        if r.returncode != 0:
            raise RuntimeError("%s: exit %d: %s" % (" ".join(argv), r.returncode, r.stderr))
        return r.stdout

    def state(self, job_id):
        """A job's (or array task's) state, also after it ended ('' once forgotten)."""
        out = self.run("squeue", "-h", "-r", "-t", "all", "-j", str(job_id).split("_")[0], "-o", "%i|%T")
        return dict(line.split("|") for line in out.split())

    def wait_idle(self, timeout=1800):
        """Until no job is pending or running."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.run("squeue", "-h", "-o", "%i").strip():
                return
            time.sleep(1)
        raise TimeoutError("jobs still queued after %d s: %s" % (timeout, self.run("squeue")))
