"""Every tool answers --help as `python3 -m <package>.<tool>` from any folder (how the Makefile, the Slurm
tasks and cv/ablation/recipe run them): the top-level folders are packages found through the runtime's
PYTHONPATH, and no module edits sys.path."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = ("tools.train", "tools.evaluate", "tools.segment", "tools.cv", "tools.ablation", "tools.recipe",
         "tools.ceiling", "tools.surgery", "tools.weights", "tools.slurm", "tools.bench", "tools.cuda.gpu_proof",
         "tools.runtime.blas_core", "tools.runtime.parallel_math", "data_prep.make_data", "data_prep.phantoms", "data_prep.fetch", "prototxt.net",
         "solver.make_solver")


@pytest.mark.parametrize("module", TOOLS)
def test_every_tool_answers_help_from_any_folder(module, tmp_path):
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=str(tmp_path),
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("usage:") and "--help" in r.stdout
    assert os.listdir(str(tmp_path)) == []          # --help writes nothing


def test_no_module_edits_sys_path():
    offenders = []
    for folder, _, files in os.walk(REPO):
        if any(part.startswith(".") or part in ("runs", "data", "build") for part in
               os.path.relpath(folder, REPO).split(os.sep)):
            continue
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and path != os.path.abspath(__file__):
                with open(path, encoding="utf-8") as f:
                    if "sys.path" in f.read():
                        offenders.append(os.path.relpath(path, REPO))
    assert not offenders, offenders
