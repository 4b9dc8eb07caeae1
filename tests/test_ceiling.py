"""tools/ceiling.py: the resolution ceiling, on masks whose answer is known and against real Caffe's upsampling."""
import numpy as np
import pytest

import paper
from tools import ceiling, score

SIDE = paper.INPUT_SIZE


def _disk(radius):
    yy, xx = np.mgrid[:SIDE, :SIDE]
    return ((yy - 49.5) ** 2 + (xx - 49.5) ** 2 < radius ** 2)[None]


@pytest.mark.parametrize("crop_mode", paper.CROP_MODES)
def test_upsample_matrix_is_caffes_deconvolution_and_crop(crop_mode):
    """M D Mᵀ equals the TS-FCN's own upscore + score_crop in Caffe for random 15x15 score maps."""
    import caffe
    from prototxt import net as netdef
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".prototxt") as f:
        f.write(netdef.text(netdef.ts_fcn("deploy", crop_mode=crop_mode, fc_channels=8)))
        f.flush()
        net = caffe.Net(f.name, caffe.TEST)
    d = np.random.RandomState(0).randn(*net.blobs["score"].data.shape).astype(np.float32)
    net.blobs["score"].data[...] = d
    net.forward(start="upscore", end="score_crop")
    m = ceiling.upsample_matrix(netdef.crop_offset(crop_mode))
    for c in range(paper.NUM_CLASSES):
        assert np.abs(net.blobs["score_crop"].data[0, c] - m @ d[0, c] @ m.T).max() < 1e-4


def test_constant_masks_are_reached_exactly():
    # the bilinear rows sum to 1 inside the crop: a constant map stays constant
    m = ceiling.upsample_matrix(paper.CROP_OFFSET_CENTER)
    assert m.sum(axis=1) == pytest.approx(np.ones(SIDE))
    assert ceiling.patient_ceiling(np.zeros((3, SIDE, SIDE)), 14) == score.EMPTY_DICE
    assert ceiling.patient_ceiling(np.ones((3, SIDE, SIDE)), 14) == 1.0
    assert ceiling.best_masks(np.ones((SIDE, SIDE)), 14).all()


def test_a_tumor_smaller_than_a_score_cell_cannot_be_drawn():
    # one pixel among 10 000: the least-squares map stays negative everywhere (a cell covers ~8 x 8 pixels)
    dot = np.zeros((1, SIDE, SIDE), np.uint8)
    dot[0, 50, 50] = 1
    assert not ceiling.best_masks(dot, 14).any()
    assert ceiling.patient_ceiling(dot, 14) == 0.0


def test_large_tumors_come_close_and_small_ones_pay_for_their_outline():
    big, small = ceiling.patient_ceiling(_disk(30), 14), ceiling.patient_ceiling(_disk(10), 14)
    assert 0.97 < big < 1.0
    assert 0.85 < small < big
    # a 3D ceiling pools the slices: a patient of one big and one small slice lies between them
    both = np.concatenate([_disk(30), _disk(10)])
    assert small < ceiling.patient_ceiling(both, 14) < big
    assert ceiling.best_masks(both, 14).shape == both.shape
