"""data_prep.intensity, augment, folds, hdf5_io: HU mapping and means, the 8 augmentations and their
exact inverses, fold sizes, and per-patient HDF5 files read back by real Caffe's HDF5Data layer."""
import os

import numpy as np
import pytest

import paper
from data_prep import augment, folds, hdf5_io, intensity


# --- intensity -------------------------------------------------------------------------------------
def test_hu_window_maps_linearly_with_clip_and_bgr_means():
    lo, hi = paper.HU_WINDOW
    hu = np.array([[lo - 500, lo, (lo + hi) / 2.0, hi, hi + 1000]], np.float32)
    x = intensity.hu_to_net(hu)
    assert x.shape == (3, 1, 5) and x.dtype == np.float32
    grey = np.array([0.0, 0.0, 127.5, 255.0, 255.0])
    for c in range(3):
        np.testing.assert_allclose(x[c, 0], grey - paper.FCN_BGR_MEAN[c], atol=1e-4)
    # channel 0 is B: -2000 HU -> -104.00699
    assert abs(x[0, 0, 1] + 104.00699) < 1e-4 and abs(x[2, 0, 3] - (255 - 122.67892)) < 1e-4
    np.testing.assert_allclose(intensity.net_to_display(x)[0], grey, atol=1e-4)


def test_hu_to_net_stack_and_other_window():
    hu = np.linspace(-1500, 500, 2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    x = intensity.hu_to_net(hu, window=(-1000, 400))
    assert x.shape == (2, 3, 4, 4)
    expect = np.clip((hu + 1000) * 255.0 / 1400, 0, 255)
    np.testing.assert_allclose(x[:, 1], expect - paper.FCN_BGR_MEAN[1], atol=1e-3)
    assert intensity.parse_window("-1000,400") == (-1000.0, 400.0)
    for bad in ("400,-1000", "1", "a,b"):
        with pytest.raises(ValueError):
            intensity.parse_window(bad)


# --- augmentation ----------------------------------------------------------------------------------
def test_eight_distinct_transforms_each_inverts_exactly():
    rng = np.random.RandomState(0)
    img = rng.randn(3, 6, 6).astype(np.float32)
    seen = set()
    for k in range(paper.AUGMENTATIONS):
        t = augment.transform(k, img)
        seen.add(t.tobytes())
        np.testing.assert_array_equal(augment.invert(k, t), img)
    assert len(seen) == 8                       # the dihedral group of the square: all different
    np.testing.assert_array_equal(augment.transform(0, img), img)
    np.testing.assert_array_equal(augment.transform(1, img)[0], np.rot90(img[0]))
    np.testing.assert_array_equal(augment.transform(4, img)[0], img[0][:, ::-1])
    with pytest.raises(ValueError):
        augment.invert(8, img)


def test_augment8_image_and_label_alike():
    rng = np.random.RandomState(1)
    imgs = rng.randn(2, 3, 5, 5).astype(np.float32)
    labs = (rng.rand(2, 5, 5) > 0.5).astype(np.uint8)
    a_img, a_lab = augment.augment8(imgs, labs)
    assert a_img.shape == (16, 3, 5, 5) and a_lab.shape == (16, 5, 5)
    for i in range(2):
        for k in range(8):
            np.testing.assert_array_equal(augment.invert(k, a_img[i * 8 + k]), imgs[i])
            np.testing.assert_array_equal(augment.invert(k, a_lab[i * 8 + k]), labs[i])
            # the label moves with the image: its pattern equals the transformed image's mask
            np.testing.assert_array_equal(a_lab[i * 8 + k], augment.transform(k, labs[i]))
    one_img, one_lab = augment.augment8(imgs[0], labs[0])
    np.testing.assert_array_equal(one_img, a_img[:8])
    np.testing.assert_array_equal(one_lab, a_lab[:8])


# --- folds -----------------------------------------------------------------------------------------
def test_fold_sizes_107_and_by_patient():
    assert folds.fold_sizes(107, 5) == [21, 21, 21, 21, 23]
    ids = ["P%03d" % i for i in range(1, 108)]
    f = folds.assign_folds(ids, 5, seed=0)
    assert [len(x) for x in f] == [21, 21, 21, 21, 23]
    assert sorted(sum(f, [])) == ids
    assert f == folds.assign_folds(list(reversed(ids)), 5, seed=0)     # deterministic
    assert f != folds.assign_folds(ids, 5, seed=1)                      # seeded
    assert [len(x) for x in folds.assign_folds(ids[:7], 3)] == [2, 2, 3]
    with pytest.raises(ValueError):
        folds.assign_folds(ids[:2], 3)


# --- HDF5 ------------------------------------------------------------------------------------------
def _patient_arrays(n=3, seed=0):
    rng = np.random.RandomState(seed)
    data = rng.randn(n, 3, paper.INPUT_SIZE, paper.INPUT_SIZE).astype(np.float32)
    label = (rng.rand(n, paper.INPUT_SIZE, paper.INPUT_SIZE) > 0.9).astype(np.uint8)
    return data, label, np.arange(10, 10 + n)


def test_hdf5_round_trip_layout_and_atomic(tmp_path):
    data, label, sl = _patient_arrays()
    path = str(tmp_path / "P001.h5")
    hdf5_io.write_patient_h5(path, data, label, sl, attrs={"params_hash": "abc"})
    back = hdf5_io.read_patient_h5(path)
    assert back["data"].dtype == np.float32 and back["data"].shape == (3, 3, 100, 100)
    assert back["label"].dtype == np.float32 and back["label"].shape == (3, 1, 100, 100)
    assert back["slice"].dtype == np.int32 and back["slice"].tolist() == [10, 11, 12]
    np.testing.assert_array_equal(back["label"][:, 0], label)
    assert back["attrs"]["params_hash"] == "abc"
    import h5py
    with h5py.File(path, "r") as f:
        assert f["data"].compression is None and f["data"].chunks is None
    # a failing write leaves neither the target nor a temp file
    with pytest.raises(ValueError):
        hdf5_io.write_patient_h5(str(tmp_path / "P002.h5"), data, label[:2], sl)
    assert sorted(os.listdir(str(tmp_path))) == ["P001.h5"]
    # a truncated file reads as "not done"
    with open(path, "rb") as f:
        head = f.read(2000)
    with open(str(tmp_path / "P003.h5"), "wb") as f:
        f.write(head)
    assert hdf5_io.read_attrs(str(tmp_path / "P003.h5")) == {}
    assert hdf5_io.read_attrs(path)["params_hash"] == "abc"


def test_caffe_hdf5data_reads_our_files(tmp_path):
    caffe = pytest.importorskip("caffe")
    from caffe import layers as L
    from tools import caffe_net
    caffe_net.use_device()
    d1, l1, s1 = _patient_arrays(2, seed=1)
    d2, l2, s2 = _patient_arrays(1, seed=2)
    hdf5_io.write_patient_h5(str(tmp_path / "P001.h5"), d1, l1, s1)
    hdf5_io.write_patient_h5(str(tmp_path / "P002.h5"), d2, l2, s2)
    (tmp_path / "list.txt").write_text("P001.h5\nP002.h5\n")     # relative paths, as in DATA/fold<k>
    ns = caffe.NetSpec()
    ns.data, ns.label = L.HDF5Data(source="list.txt", batch_size=3, ntop=2)
    proto = tmp_path / "net.prototxt"
    proto.write_text(str(ns.to_proto()))
    cwd = os.getcwd()
    os.chdir(str(tmp_path))
    try:
        net = caffe.Net(str(proto), caffe.TEST)
        net.forward()
    finally:
        os.chdir(cwd)
    assert net.blobs["data"].data.shape == (3, 3, 100, 100)
    assert net.blobs["label"].data.shape == (3, 1, 100, 100)
    np.testing.assert_array_equal(net.blobs["data"].data, np.concatenate([d1, d2]))
    np.testing.assert_array_equal(net.blobs["label"].data[:, 0], np.concatenate([l1, l2]))
