"""data_prep.crop: the box rule (SPEC §5), padding at the border, linear resize, label threshold, uncrop."""
import numpy as np
import pytest
from scipy import ndimage

import paper
from data_prep import crop
from data_prep.crop import Box


def _dice(a, b):
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


def _disc(shape, r, c, radius):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return ((yy - r) ** 2 + (xx - c) ** 2 <= radius ** 2).astype(np.uint8)


def test_box_for_extent_rule():
    # 10x30 tumor: side = max(100, 2 x 30) = 100, centre = midpoint of the bounding box.
    b = crop.box_for_extent(10, 20, 19, 49)
    assert (b.row, b.col, b.side) == (14.5, 34.5, paper.BOX_MIN_SIDE)
    # 80 rows (r1 - r0 + 1) -> 160 side.
    b = crop.box_for_extent(100, 200, 179, 239)
    assert b.side == paper.BOX_SCALE * 80 == 160
    assert (b.row, b.col) == (139.5, 219.5)
    with pytest.raises(ValueError):
        crop.box_for_extent(5, 5, 4, 10)


def test_box_edges_on_pixel_edges_for_odd_extent():
    b = crop.box_for_extent(10, 10, 20, 30)        # 11 x 21: midpoints 15, 20 -> 15.5, 20.5
    assert (b.row, b.col, b.side) == (15.5, 20.5, 100)
    assert b.top % 1 == 0.5 and b.left % 1 == 0.5
    b = crop.box_for_extent(0, 0, 44, 44)          # 45 -> side 100 (not 90)
    assert b.side == 100 and b.top == -27.5
    b = crop.box_for_extent(0, 0, 60, 60)          # 61 -> side 122, midpoint 30 -> top -31 -> 30.5
    assert b.side == 122 and b.row == 30.5
    b = crop.box_for_extent(0, 0, 60, 60, scale=2.5)   # side 152.5 is not integral: exact midpoint
    assert b.row == 30.0


def test_patient_boxes_patient_and_slice_modes():
    m = np.zeros((6, 256, 256), np.uint8)
    m[1, 100:110, 100:120] = 1          # 10 x 20
    m[2, 96:150, 104:110] = 1           # 54 x 6  -> largest extent 54 -> side 108
    m[4, 120:125, 130:135] = 1          # slice 3 has no tumor
    boxes = crop.patient_boxes(m)
    assert sorted(boxes) == [1, 2, 4]
    b = boxes[1]
    assert all(boxes[z] == b for z in boxes)
    assert b.side == 108
    # centre of the bounding box over the patient: rows 96..149, cols 100..134
    # centre of the bounding box over the patient: rows 96..149, cols 100..134 (odd extent 35: the
    # midpoint 117 moves to 117.5 so the box edges lie on pixel edges)
    assert (b.row, b.col) == ((96 + 149) / 2, (100 + 134) / 2 + 0.5)
    per = crop.patient_boxes(m, mode="slice")
    assert per[1] == Box((100 + 109) / 2, (100 + 119) / 2, 100)
    assert per[2] == Box((96 + 149) / 2, (104 + 109) / 2, 108)
    assert per[4] == Box(122.5, 132.5, 100)
    assert crop.patient_boxes(np.zeros((3, 8, 8))) == {}
    with pytest.raises(ValueError):
        crop.patient_boxes(m, mode="bogus")


def test_crop_is_exact_copy_when_box_is_100_and_half_integer_centre():
    rng = np.random.RandomState(0)
    img = rng.uniform(-1000, 1000, (300, 300)).astype(np.float32)
    b = crop.box_for_extent(100, 60, 109, 69)   # centre (104.5, 64.5), side 100
    out = crop.crop_slice(img, b)
    assert out.dtype == np.float32 and out.shape == (100, 100)
    np.testing.assert_array_equal(out, img[55:155, 15:115])


@pytest.mark.parametrize("box", [Box(150.0, 170.0, 137.0), Box(20.0, 490.0, 160.0),
                                 Box(3.5, 7.0, 250.0), Box(600.0, 100.0, 100.0)])
def test_crop_matches_map_coordinates_order1(box):
    """Linear resize = scipy map_coordinates(order=1) on the slice padded with air."""
    rng = np.random.RandomState(1)
    img = rng.uniform(-1000, 2000, (512, 512)).astype(np.float32)
    out = crop.crop_slice(img, box)
    j = np.arange(paper.INPUT_SIZE) + 0.5
    ys = box.row - box.side / 2 + j * box.side / paper.INPUT_SIZE
    xs = box.col - box.side / 2 + j * box.side / paper.INPUT_SIZE
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    padded = np.pad(img, 1, constant_values=paper.AIR_HU)     # mode nearest then extends the air
    ref = ndimage.map_coordinates(padded.astype(np.float64), [yy + 1, xx + 1], order=1, mode="nearest")
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-3)


def test_padding_with_air_at_the_image_border():
    img = np.full((512, 512), 40.0, np.float32)
    b = crop.box_for_extent(0, 500, 9, 511)       # tumor in the top-right corner: box leaves the image
    assert b.side == 100 and (b.row, b.col) == (4.5, 505.5)
    out = crop.crop_slice(img, b)
    # box rows -45.5..54.5 -> the first 45 crop rows are outside, cols 455.5..555.5 -> last 44 outside
    assert (out[:45] == paper.AIR_HU).all()
    assert (out[:, 56:] == paper.AIR_HU).all()
    assert (out[45:, :56] == 40.0).all()
    # fully outside the image: all air
    assert (crop.crop_slice(img, Box(-300.0, -300.0, 100)) == paper.AIR_HU).all()


def test_stack_crop_equals_per_slice():
    rng = np.random.RandomState(2)
    stack = rng.uniform(-1000, 1000, (4, 128, 160)).astype(np.float32)
    b = Box(30.25, 140.0, 131.0)
    np.testing.assert_array_equal(crop.crop_slice(stack, b),
                                  np.stack([crop.crop_slice(s, b) for s in stack]))


def test_label_resize_threshold():
    # A 200-wide box halves the resolution: a 2x2 block averages to exactly 0.5 -> kept (>= 0.5);
    # a stripe of one original pixel column contributes 0.5 only where aligned.
    lab = np.zeros((400, 400), np.uint8)
    b = Box(199.5, 199.5, 200.0)                  # box rows 99.5..299.5 -> crop j samples 100 + 2j + 0.5
    lab[150:152, 150:152] = 1                    # one crop pixel (j = 25) sees exactly the 2x2 block
    out = crop.crop_label(lab, b)
    assert out.dtype == np.uint8 and set(np.unique(out)) <= {0, 1}
    assert out.sum() == 1 and out[25, 25] == 1
    lab[:] = 0
    lab[150, 150:152] = 1                        # a 1x2 block: interpolated value 0.5 * 1 = 0.5 -> kept
    assert crop.crop_label(lab, b)[25, 25] == 1
    lab[:] = 0
    lab[150, 150] = 1                            # a single pixel: 0.25 -> dropped
    assert crop.crop_label(lab, b).sum() == 0
    # threshold equals paper.LABEL_THRESHOLD on the resized float
    f = crop.crop_slice(_disc((400, 400), 200, 210, 30).astype(np.float32), b, fill=0.0)
    np.testing.assert_array_equal(crop.crop_label(_disc((400, 400), 200, 210, 30), b),
                                  (f >= paper.LABEL_THRESHOLD).astype(np.uint8))


def test_uncrop_inverts_geometry_exactly_for_identity_box():
    rng = np.random.RandomState(3)
    img = rng.uniform(0, 1, (200, 220)).astype(np.float32)
    b = crop.box_for_extent(40, 50, 49, 59)
    back = crop.uncrop(crop.crop_slice(img, b), b, img.shape)
    inside = np.zeros(img.shape, bool)
    inside[0:95, 5:105] = True    # rows -5.5..94.5 -> 0..94 ; cols 4.5..104.5 -> 5..104
    np.testing.assert_array_equal(back[inside], img[inside])
    assert (back[~inside] == 0).all()


@pytest.mark.parametrize("radius,factor,centre", [
    (8, 1.0, (100, 100)),          # small tumor, min-side box (6x)
    (17, 2.0, (200, 200)),         # 35-pixel (odd) extent, box 100: no half-pixel dilation
    (22, 2.0, (300, 200)),         # 45-pixel extent
    (35, 1.5, (250, 250)),         # box 1.5x the tumor, non-integral scale
    (30, 2.0, (256, 256)),         # the training rule
    (45, 3.0, (250, 300)),         # box 3x the tumor
    (25, 3.0, (20, 490)),          # 3x box leaving the image at a corner
    (40, 2.0, (505, 30)),          # tumor cut by the bottom edge
])
def test_oracle_round_trip_dice(radius, factor, centre):
    shape = (512, 512)
    mask = _disc(shape, centre[0], centre[1], radius)
    mask[centre[0] - radius // 2:centre[0] + radius // 3, centre[1]:centre[1] + radius + 6] = 1  # irregular
    rows, cols = np.nonzero(mask)
    b = crop.box_for_extent(rows.min(), cols.min(), rows.max(), cols.max(), scale=factor)
    lab = crop.crop_label(mask, b)
    back = crop.uncrop(lab, b, shape) >= 0.5
    assert _dice(back, mask) >= 0.97


def test_uncrop_zero_outside_box_and_stack():
    b = Box(50.0, 60.0, 120.0)
    ones = np.ones((2, 100, 100), np.float32)
    back = crop.uncrop(ones, b, (256, 256))
    assert back.shape == (2, 256, 256) and back.dtype == np.float32
    # inside: rows -10..110 -> 0..110, cols 0..120
    assert (back[:, :111, :121] == 1).all()
    assert back[:, 111:].sum() == 0 and back[:, :, 121:].sum() == 0
    assert crop.uncrop(ones[0], Box(-500.0, -500.0, 100), (64, 64)).sum() == 0


def test_crop_patient_groups_and_orders():
    rng = np.random.RandomState(4)
    hu = rng.uniform(-1000, 500, (5, 200, 200)).astype(np.float32)
    m = np.zeros((5, 200, 200), np.uint8)
    m[3, 50:70, 60:80] = 1
    m[1, 55:60, 65:70] = 1
    for mode in paper.BOX_MODES:
        boxes = crop.patient_boxes(m, mode=mode)
        imgs, labs, zs = crop.crop_patient(hu, m, boxes)
        assert zs.tolist() == [1, 3] and zs.dtype == np.int32
        for i, z in enumerate(zs):
            np.testing.assert_array_equal(imgs[i], crop.crop_slice(hu[z], boxes[z]))
            np.testing.assert_array_equal(labs[i], crop.crop_label(m[z], boxes[z]))


@pytest.mark.parametrize("side,top,left", [(200, 50, 40), (544, -100, -120), (150, 10, 20), (333, -16, 0)])
def test_antialias_resize_is_pils_bilinear(side, top, left):
    """--resize antialias reduces a box as PIL's bilinear resize (behind scipy.misc.imresize) does: the same
    values on a slice padded far enough that PIL's border handling never applies."""
    from PIL import Image
    img = np.random.RandomState(0).rand(300, 300).astype(np.float32) * 1000
    box = crop.Box(top + side / 2.0, left + side / 2.0, float(side))
    ours = crop.crop_slice(img, box, fill=0.0, resize="antialias")
    pad = 600
    # PIL's pixel x covers [x, x + 1]; ours is centred on x: PIL coordinates are ours + 0.5
    pil = np.asarray(Image.fromarray(np.pad(img, pad)).resize(
        (100, 100), Image.BILINEAR, box=(left + pad + 0.5, top + pad + 0.5, left + pad + 0.5 + side,
                                          top + pad + 0.5 + side)))
    assert np.abs(ours - pil).max() < 1e-3
    assert np.abs(crop.crop_slice(img, box, fill=0.0) - pil).mean() > 10    # the default reads 2x2 neighbours


def test_antialias_resize_keeps_constants_fill_and_small_boxes():
    img = np.full((2, 300, 300), 40.0, np.float32)
    inside = crop.crop_slice(img, crop.Box(150.0, 150.0, 280.0), resize="antialias")
    assert inside.shape == (2, 100, 100) and np.allclose(inside, 40.0)
    edge = crop.crop_slice(img[0], crop.Box(0.0, 150.0, 280.0), resize="antialias")     # half above the slice
    assert np.allclose(edge[:40], paper.AIR_HU) and np.allclose(edge[-40:], 40.0)
    box = crop.Box(120.0, 130.5, 100.0)                 # no reduction: both modes interpolate linearly
    assert np.array_equal(crop.crop_slice(img[0], box, resize="antialias"), crop.crop_slice(img[0], box))
    label = np.zeros((300, 300), np.uint8)
    label[100:200, 100:200] = 1
    lab = crop.crop_label(label, crop.Box(150.0, 150.0, 200.0), resize="antialias")
    assert lab.sum() == 50 * 50 and set(np.unique(lab)) == {0, 1}
    with pytest.raises(ValueError):
        crop.crop_slice(img[0], box, resize="bicubic")
