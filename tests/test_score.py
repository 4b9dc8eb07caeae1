"""tools/score.py: exact Dice values on hand-made masks (3D vs 2D Dice differ where they should)."""
import numpy as np
import pytest

import paper

from tools import score


def _patient():
    """Two 20x20 slices: a 10x10 tumor found exactly, and a 2x2 tumor missed by a disjoint 2x2 guess."""
    truth = np.zeros((2, 20, 20), np.uint8)
    pred = np.zeros_like(truth)
    truth[0, 5:15, 5:15] = 1
    pred[0, 5:15, 5:15] = 1
    truth[1, 0:2, 0:2] = 1
    pred[1, 10:12, 10:12] = 1
    return pred, truth


def test_dice_2d_and_3d_differ_exactly():
    pred, truth = _patient()
    assert score.dice_2d(pred, truth).tolist() == [1.0, 0.0]
    # 3D: 2*100 / (104 + 104): the small missed tumor weighs 4 pixels, not half the score.
    assert score.dice_3d(pred, truth) == pytest.approx(200.0 / 208.0, abs=1e-12)
    assert score.counts(pred, truth) == (100, 104, 104)


def test_partial_overlap_and_accuracy():
    truth = np.zeros((1, 10, 10), bool)
    pred = np.zeros_like(truth)
    truth[0, 0:4, 0:5] = True       # 20 pixels
    pred[0, 2:6, 0:5] = True        # 20 pixels, 10 shared
    assert score.dice(pred, truth) == pytest.approx(0.5)
    assert score.pixel_accuracy(pred, truth) == pytest.approx(80 / 100)
    pred2, truth2 = _patient()
    assert score.pixel_accuracy(pred2, truth2) == pytest.approx(792 / 800)


def test_empty_convention():
    z = np.zeros((3, 4, 4))
    assert score.dice_2d(z, z).tolist() == [1.0, 1.0, 1.0]
    assert score.dice_3d(z, z) == score.EMPTY_DICE == 1.0
    one = z.copy()
    one[1, 0, 0] = 1
    assert score.dice_2d(one, z).tolist() == [1.0, 0.0, 1.0]
    assert score.dice_3d(one, z) == 0.0


def test_patient_and_cohort_summary():
    pred, truth = _patient()
    a = score.patient_scores(pred, truth)
    assert a["dice_2d_mean"] == pytest.approx(0.5)
    b = score.patient_scores(truth, truth)
    s = score.cohort_summary({"P001": a, "P002": b})
    assert s["mean_dice_3d"] == pytest.approx((200 / 208 + 1.0) / 2)
    assert s["sd_dice_3d"] == pytest.approx(np.std([200 / 208, 1.0], ddof=1))
    assert s["mean_dice_2d"] == pytest.approx((1 + 0 + 1 + 1) / 4)
    assert s["pooled_dice"] == pytest.approx(2 * 204 / (208 + 208))
    assert score.mean_sd([0.7]) == (0.7, 0.0)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        score.dice(np.zeros((2, 2)), np.zeros((3, 3)))


def test_calibration_counts():
    truth = np.zeros((1, 10, 10), np.uint8)
    truth[0, :5, :4] = 1                      # 20 tumor pixels
    pred = np.zeros_like(truth)
    pred[0, :5, :8] = 1                       # 40 predicted, 20 of them right
    s = score.patient_scores(pred, truth)
    assert (s["precision"], s["recall"], s["pred_ratio"]) == (0.5, 1.0, 2.0)
    none = score.patient_scores(np.zeros_like(truth), truth)
    assert np.isnan(none["precision"]) and none["recall"] == 0.0 and none["pred_ratio"] == 0.0
    c = score.cohort_summary({"P001": s, "P002": none})
    assert c["mean_precision"] == 0.5             # a patient with nothing predicted has no precision
    assert c["mean_recall"] == 0.5 and c["mean_pred_ratio"] == 1.0


def test_decision_rules():
    assert score.DEFAULT_DECISION == paper.DECISION_RULE == "argmax"
    assert score.tumor_threshold("argmax", (0.04, 0.96)) == 0.5
    # the report's weights shift the net's tumor probability: p = 0.5 becomes 0.96
    assert score.tumor_threshold("prior", (0.04, 0.96)) == pytest.approx(0.96)
    assert score.tumor_threshold("prior", (0.5, 0.5)) == 0.5
    p = np.array([0.2, 0.5, 0.51, 0.97])
    assert score.predict(p).tolist() == [False, False, True, True]   # argmax: ties go to background
    assert score.predict(p, score.tumor_threshold("prior")).tolist() == [False, False, False, True]
    with pytest.raises(ValueError):
        score.tumor_threshold("median")
