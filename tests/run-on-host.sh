#!/usr/bin/env bash
# The tests that run on this machine, outside the Caffe runtime: tests/test_slurm.py starts a one-node Slurm
# cluster here and drives `make cv/ablation SCHEDULER=slurm` (Slurm's daemons and commands are programs of
# this host; each task still runs in the runtime). `make test` calls this after the suite in the runtime.
#
#   tests/run-on-host.sh ["PYTEST ARGS"]     one string, split like a shell line (default tests/test_slurm.py)
#
# What is missing (python3, pytest, Debian's slurm-wlm and munge) is installed with apt-get where this runs
# as root; where it cannot be (no root, no apt, no network, or inside a container), the tests skip and say why.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
args=${1:-tests/test_slurm.py}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"     # the checkout, as inside the runtime

say() { echo "[host tests] $*" >&2; }
missing=()
command -v python3 >/dev/null || missing+=(python3)
command -v python3 >/dev/null && python3 -c 'import pytest' 2>/dev/null || missing+=(python3-pytest)
for c in sbatch slurmctld slurmd; do command -v "$c" >/dev/null || { missing+=(slurm-wlm); break; }; done
command -v munged >/dev/null || missing+=(munge)

if [ ${#missing[@]} -gt 0 ]; then
    if [ -e /.dockerenv ] || [ -e /run/.containerenv ]; then
        say "in a container: not installing ${missing[*]} here (run make test on the host for the Slurm tests)"
    elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing ${missing[*]}"
        { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"; } >/dev/null ||
            say "could not install ${missing[*]}"
    else
        say "not root or no apt-get: cannot install ${missing[*]}"
    fi
fi
if ! command -v python3 >/dev/null || ! python3 -c 'import pytest' 2>/dev/null; then
    say "SKIPPED tests/test_slurm.py: no python3 with pytest on this machine"
    exit 0
fi
exec python3 - "$args" <<'PY'
import shlex, sys
import pytest
sys.exit(pytest.main(shlex.split(sys.argv[1])))
PY
