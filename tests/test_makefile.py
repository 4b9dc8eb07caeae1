"""The Makefile hands every value to its tool verbatim and never evaluates it.

Each target that takes a path, a pattern or a number runs for real through make and bash, with
RUNTIME= pointing at a recorder that stands in for tools/runtime/runtime.sh: it writes down the argv
and TSFCN_BIND it receives. The values hold spaces, quotes, $, backticks, $(shell ...) and unicode;
the test asserts the exact argument the tool gets and that nothing ran. `make -n` is checked too
(a dry run must not evaluate anything either). The real `make data` and `make segment` on such paths
are in tests/test_make_data.py and tests/test_segment.py.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make")

RECORDER = r'''#!%s
import json, os, sys
if sys.argv[1:] == ["ensure"]:
    sys.exit(0)
with open(os.environ["RECORD_TO"], "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "bind": os.environ.get("TSFCN_BIND")}) + "\n")
''' % sys.executable


def hostile(tmp_path, tag):
    """A path whose name holds every character a shell or make would act on."""
    return str(tmp_path / ("%s dir 'single' \"double\" $HOME $(touch pwned_a) `touch pwned_b` "
                           "$(shell touch pwned_c) ${USER} \\ ; & | > < * ? ü漢 #x" % tag))


def run_target(tmp_path, target, values, dry=False):
    recorder = tmp_path / "recorder.py"
    recorder.write_text(RECORDER)
    recorder.chmod(0o755)
    record = tmp_path / "record.jsonl"
    if record.exists():
        record.unlink()
    env = dict(os.environ, RECORD_TO=str(record))
    args = ["make", "--no-print-directory", "-C", REPO, target, "RUNTIME=%s" % recorder]
    args += ["%s=%s" % kv for kv in values.items()] + (["-n"] if dry else [])
    r = subprocess.run(args, capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    for where in (REPO, str(tmp_path)):
        assert not any(n.startswith("pwned") for n in os.listdir(where)), "a value was evaluated"
    if dry:
        return r.stdout
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(calls) == 1 and calls[0]["argv"][0] == "exec"
    return calls[0]["argv"][1:], calls[0]["bind"].split(":")


ROI = "^gtv$|^ctv$"
TARGETS = {
    # target: ({VAR: value or a tag for a hostile path}, {VAR: the option that must carry it})
    "phantoms": ({"OUT": "p", "N": "3", "SEED": "7"}, {"OUT": "--out", "N": "--n", "SEED": "--seed"}),
    "data": ({"RAW": "p", "DATA": "p", "ROI": ROI, "BOX": "slice", "HU_WINDOW": "-1000,400", "FOLDS": "3",
              "RESIZE": "antialias"},
             {"RAW": "--raw", "DATA": "--data", "ROI": "--roi", "BOX": "--box", "HU_WINDOW": "--hu-window",
              "FOLDS": "--folds", "RESIZE": "--resize"}),
    "recipe": ({"DATA": "p", "OUT": "p", "FOLD": "1", "SEED": "4"},
               {"DATA": "--data", "OUT": "--out", "FOLD": "--fold", "SEED": "--seed"}),
    "train": ({"DATA": "p", "RUN": "p", "WEIGHTS": "p", "FOLD": "2", "PROFILE": "fast"},
              {"DATA": "--data", "RUN": "--run", "WEIGHTS": "--weights", "FOLD": "--fold", "PROFILE": "--profile"}),
    "eval": ({"DATA": "p", "RUN": "p", "SNAPSHOT": "p"}, {"DATA": "--data", "RUN": "--run", "SNAPSHOT": "--snapshot"}),
    "cv": ({"DATA": "p", "WEIGHTS": "p", "RUNS": "p", "TRAIN_ARGS": "--crop aligned --fc-channels 16"},
           {"DATA": "--data", "WEIGHTS": "--weights", "RUNS": "--runs", "TRAIN_ARGS": "--train-args"}),
    "ablation": ({"RAW": "p", "OUT": "p", "TRAIN_ARGS": "--max-iter 3 $(touch pwned_t)"},
                 {"RAW": "--raw", "OUT": "--out", "TRAIN_ARGS": "--train-args"}),
    "segment": ({"SCAN": "p", "ROI_FILE": "p", "ROI": ROI, "MODEL": "p", "OUT": "p", "PROTOTXT": "p",
                 "THRESHOLD": "0.4", "BATCH": "2", "HU_WINDOW": "-1000,400"},
                {"SCAN": "--scan", "ROI_FILE": "--roi", "ROI": "--roi-regex", "MODEL": "--model", "OUT": "--out",
                 "PROTOTXT": "--prototxt", "THRESHOLD": "--threshold", "BATCH": "--batch",
                 "HU_WINDOW": "--hu-window"}),
    "weights": ({"WEIGHTS_SOURCE": "vgg16 `touch pwned_w`"}, {"WEIGHTS_SOURCE": "--source"}),
}
PATH_VARS = {"RAW", "DATA", "RUN", "RUNS", "SCAN", "OUT", "MODEL", "WEIGHTS", "SNAPSHOT", "ROI_FILE", "PROTOTXT"}


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_value_reaches_the_tool_verbatim(tmp_path, target):
    given, options = TARGETS[target]
    values = {k: (hostile(tmp_path, k) if v == "p" else v) for k, v in given.items()}
    argv, bind = run_target(tmp_path, target, values)
    for var, option in options.items():
        assert "%s=%s" % (option, values[var]) in argv, (var, argv)
        if var in PATH_VARS:
            assert values[var] in bind, (var, bind)
    stdout = run_target(tmp_path, target, values, dry=True)          # make -n evaluates nothing either
    assert "-m tools." in stdout or "-m data_prep." in stdout


def test_box_with_a_leading_minus_and_word_lists(tmp_path):
    argv, _ = run_target(tmp_path, "segment", {"SCAN": "s", "BOX": "-2,0,9,9", "SLICES": ":4", "MODEL": "m",
                                               "OUT": "o"})
    assert "--box=-2,0,9,9" in argv and "--slices=:4" in argv
    argv, _ = run_target(tmp_path, "train", {"TRAIN_ARGS": "--crop aligned  $(touch pwned_x) `id`"})
    assert argv[-5:] == ["--crop", "aligned", "$(touch", "pwned_x)", "`id`"], argv
    argv, _ = run_target(tmp_path, "test", {"PYTEST_ARGS": "tests/test_paper.py -x -q"})
    assert argv[-5:] == ["-m", "pytest", "tests/test_paper.py", "-x", "-q"], argv


def test_exec_hands_cmd_to_bash_as_one_argument(tmp_path):
    cmd = "printf '%s\\n' \"a  b\" $((1+2)) 'ü漢'"
    argv, _ = run_target(tmp_path, "exec", {"CMD": cmd})
    assert argv == ["bash", "-c", cmd]
    out = subprocess.run(argv, capture_output=True, text=True).stdout      # what the runtime then runs
    assert out == "a  b\n3\nü漢\n"


def test_recipe_defaults_and_word_list(tmp_path):
    argv, _ = run_target(tmp_path, "recipe", {"ONLY": "base  lr$(touch pwned_o)"})
    assert "--data=runs/demo/data" in argv and "--out=runs/recipe" in argv
    assert argv[-4:] == ["--only", "base", "lr$(touch", "pwned_o)"], argv
