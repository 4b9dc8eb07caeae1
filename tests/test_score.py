"""tools/score.py: exact Dice values on hand-made masks (3D vs 2D Dice differ where they should)."""
import numpy as np
import pytest

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
