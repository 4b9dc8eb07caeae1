"""paper.py holds the report's numbers; they must say what docs/SPEC.md says (a copy of the project SPEC)."""
import math
import os
import re

import pytest

import paper

SPEC = open(os.path.join(os.path.dirname(__file__), "..", "docs", "SPEC.md"), encoding="utf-8").read()


def spec_number(pattern):
    m = re.search(pattern, SPEC)
    assert m, "SPEC.md no longer matches %r" % pattern
    return float(m.group(1).replace("−", "-"))


def test_network_numbers():
    assert paper.CONV1_1_PAD == spec_number(r"conv1_1 \*\*pad (\d+)\*\*")
    assert paper.FC6_CHANNELS == spec_number(r"\| fc6, relu, dropout 0\.5 \| (\d+) ch")
    assert paper.FC6_KERNEL == spec_number(r"\*\*(\d+)×\d+\*\*, pad 0")
    assert paper.DROPOUT_RATIO == spec_number(r"fc6, relu, dropout ([\d.]+)")
    assert paper.UPSCORE_KERNEL == spec_number(r"kernel (\d+), stride \d+")
    assert paper.UPSCORE_STRIDE == spec_number(r"kernel \d+, stride (\d+)")
    assert paper.CROP_OFFSET_CENTER == spec_number(r"\"center\" crop: offset (\d+)")
    assert [c for c, _ in paper.CONV_BLOCKS] == [64, 128, 256]
    assert paper.INPUT_SIZE == spec_number(r"input 3×(\d+)×")
    assert paper.PRETRAINED_LR_MULT == spec_number(r"learn at ([\d.]+)× the rate")
    assert paper.PRETRAINED_LAYERS[0] == "conv1_1" and paper.PRETRAINED_LAYERS[-1] == "conv3_2"


@pytest.mark.parametrize("blob,pattern", [
    ("conv1_1", r"64×(\d+)×\d+ → 64×\d+"), ("pool1", r"64×\d+×\d+ → 64×(\d+)×"),
    ("pool2", r"128×\d+×\d+ → 128×(\d+)×"), ("pool3", r"256×\d+×\d+ → 256×(\d+)×"),
    ("fc6", r"4096×(\d+)×\d+ \|\n\| 5"), ("score", r"\| 2×(\d+)×\d+ \|"),
    ("upscore", r"2×(\d+)×\d+ → 2×"), ("score_crop", r"→ 2×(\d+)×\d+ \|"),
])
def test_blob_sides(blob, pattern):
    assert paper.BLOB_SIDES[blob] == spec_number(pattern)


def test_loss_and_learning():
    assert paper.CLASS_WEIGHTS == (spec_number(r"background ([\d.]+), mean"), spec_number(r"tumor ([\d.]+), background"))
    assert paper.LOSS_NORMALIZE is True
    assert paper.BASE_LR == spec_number(r"base_lr ([\de.-]+)")
    assert (paper.MOMENTUM, paper.MOMENTUM2, paper.DELTA) == (
        spec_number(r"β1 ([\d.]+)"), spec_number(r"β2 ([\d.]+)"), spec_number(r"ε ([\de.-]+)"))
    assert paper.LR_GAMMA == spec_number(r"gamma ([\d.]+)")
    assert paper.LR_STEPS_PER_EPOCH == spec_number(r"stepsize = epoch/(\d+)")
    assert paper.WEIGHT_DECAY == spec_number(r"weight decay ([\de.-]+) comes")
    assert paper.BATCH_SIZE == spec_number(r"batch (\d+), about")
    assert paper.EPOCHS == spec_number(r"about (\d+) epochs")
    assert paper.REPORT_VAL_DICE_3D == spec_number(r"validation 3D\s+Dice ([\d.]+)")
    assert paper.REPORT_TEST_DICE_3D == spec_number(r"test 3D\s+Dice (\d\.\d+)")


def test_paper_profile_is_spec_section_4():
    """PROFILE=paper gives SPEC §4's solver and the report's training net, read from SPEC's text (not from paper.py)."""
    from solver import make_solver, profiles
    epoch = 20000
    s = make_solver.solver_parameter("train.prototxt", epoch, "snap", "paper")
    assert s.type == "Adam" and s.lr_policy == "step"
    assert s.base_lr == pytest.approx(spec_number(r"base_lr ([\de.-]+)"))
    assert s.gamma == pytest.approx(spec_number(r"gamma ([\d.]+)"))
    assert s.stepsize == math.ceil(epoch / spec_number(r"stepsize = epoch/(\d+)"))
    assert s.max_iter == spec_number(r"about (\d+) epochs") * epoch
    assert (s.momentum, s.momentum2, s.delta) == pytest.approx(
        (spec_number(r"β1 ([\d.]+)"), spec_number(r"β2 ([\d.]+)"), spec_number(r"ε ([\de.-]+)")))
    assert s.weight_decay == pytest.approx(spec_number(r"weight decay ([\de.-]+) comes"))
    assert s.iter_size == 1
    p = profiles.settings("paper")
    assert p["pretrained"] is True
    assert p["batch_size"] == spec_number(r"batch (\d+), about")
    assert tuple(p["class_weights"]) == (spec_number(r"background ([\d.]+), mean"),
                                         spec_number(r"tumor ([\d.]+), background"))
    assert p["dropout"] == spec_number(r"fc6, relu, dropout ([\d.]+)")


def test_data_preparation():
    assert paper.BOX_MIN_SIDE == spec_number(r"side = max\((\d+), \d ×")
    assert paper.BOX_SCALE == spec_number(r"side = max\(\d+, (\d) ×")
    assert paper.AIR_HU == spec_number(r"pad with air, ([−\d]+) HU")
    assert paper.HU_WINDOW == (spec_number(r"map ([−\d]+)…\d+ linearly"), spec_number(r"map [−\d]+…(\d+) linearly"))
    means = re.search(r"B ([\d.]+), G ([\d.]+), R ([\d.]+)", SPEC).groups()
    assert paper.FCN_BGR_MEAN == tuple(float(m) for m in means)
    assert paper.LABEL_THRESHOLD == spec_number(r"then threshold ([\d.]+)")
    assert paper.AUGMENTATIONS == spec_number(r"Augment (\d+)×")
    assert paper.N_FOLDS == spec_number(r"(\d+) folds by patient")


def test_derived_sizes_are_consistent():
    # The center crop takes the middle of the 128x128 upsampled map.
    assert paper.CROP_OFFSET_CENTER == (paper.BLOB_SIDES["upscore"] - paper.INPUT_SIZE) // 2
    # Deconvolution output side = (in - 1) * stride + kernel.
    assert paper.BLOB_SIDES["upscore"] == (paper.BLOB_SIDES["score"] - 1) * paper.UPSCORE_STRIDE + paper.UPSCORE_KERNEL
    # conv1_1 with pad 32 and a 3x3 kernel grows the 100x100 input.
    assert paper.BLOB_SIDES["conv1_1"] == paper.INPUT_SIZE + 2 * paper.CONV1_1_PAD - 2
    # fc6 (7x7, no pad) on pool3.
    assert paper.BLOB_SIDES["fc6"] == paper.BLOB_SIDES["pool3"] - paper.FC6_KERNEL + 1
    # Caffe pools with ceil.
    assert paper.BLOB_SIDES["pool1"] == math.ceil(paper.BLOB_SIDES["conv1_1"] / 2)
