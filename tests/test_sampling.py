"""tools/sampling.py: patient-balanced training lists, counted by the solver and read by Caffe's HDF5Data."""
import collections
import os

import caffe
from caffe import layers as L
import numpy as np
import pytest

from data_prep import hdf5_io
from solver import make_solver
from tools import sampling

SIZE = 8


def _cohort(data_dir, slices):
    """make_data's layout: patients/P00k_aug/z<slice>_a<k>.h5 (one image per file, 2 per slice) whose pixels
    all hold the patient's number; fold0/train.txt lists them all, relative to fold0."""
    lines = []
    for i, n in enumerate(slices):
        folder = os.path.join(data_dir, "patients", "P%03d_aug" % (i + 1))
        z = np.repeat(np.arange(n), 2)
        data = np.full((len(z), 3, SIZE, SIZE), i + 1, np.float32)
        names = hdf5_io.write_augmented(folder, data, np.zeros((len(z), 1, SIZE, SIZE), np.float32), z)
        lines += [os.path.join("..", "patients", "P%03d_aug" % (i + 1), name) for name in names]
    os.makedirs(os.path.join(data_dir, "fold0"))
    with open(os.path.join(data_dir, "fold0", "train.txt"), "w") as f:
        f.writelines(line + "\n" for line in lines)
    return os.path.join(data_dir, "fold0")


def test_each_patient_equally_often_with_distinct_files_in_the_remainder():
    paths = ["p/A_aug/z%04d_a0.h5" % z for z in range(7)] + ["p/B_aug/z%04d_a0.h5" % z for z in range(3)] + \
            ["p/C.h5"]                                  # a file holding a whole patient is one patient too
    out = sampling.patient_balanced(paths, seed=3)
    counts = collections.Counter(sampling.patient_key(p) for p in out)
    assert counts == {"p/A_aug": 7, "p/B_aug": 7, "p/C.h5": 7}
    b = collections.Counter(p for p in out if "/B_aug/" in p)
    assert sorted(b.values()) == [2, 2, 3]              # 7 = 2 x 3 + 1 distinct extra
    assert [p for p in out if "/A_aug/" in p] == paths[:7]   # the largest patient: its files once
    assert sampling.patient_balanced(paths, seed=3) == out   # seeded
    assert sampling.patient_balanced([]) == []


def test_balanced_list_is_what_the_solver_counts_and_caffe_reads(tmp_path, monkeypatch):
    data = str(tmp_path / "my data é")           # Caffe splits a list at whitespace: its lines stay relative
    fold_dir = _cohort(data, slices=[6, 2, 1])
    run = str(tmp_path / "run ü")
    os.makedirs(run)
    assert sampling.train_source(fold_dir, run, "image") == "train.txt"
    assert not os.path.exists(os.path.join(run, sampling.BALANCED_LIST))
    source = sampling.train_source(fold_dir, run, "patient", seed=0)
    assert os.path.isabs(source) and os.path.dirname(source) == run
    assert open(source).read().split() == [line for line in open(source).read().splitlines()]
    assert make_solver.epoch_size(data, 0) == 18           # 2 x (6 + 2 + 1) images
    assert make_solver.epoch_size(data, 0, list_path=source) == 36   # 3 patients x 12
    with pytest.raises(ValueError):
        sampling.train_source(fold_dir, run, "slice")
    # Caffe's HDF5Data, shuffling, draws each patient 12 times in one pass over the list, with its cwd the
    # fold's folder as tools/train.py runs it
    n = caffe.NetSpec()
    n.data, n.label = L.HDF5Data(ntop=2, hdf5_data_param=dict(source=source, batch_size=1, shuffle=True))
    n.silence = L.Silence(n.label, ntop=0)
    path = str(tmp_path / "net.prototxt")
    with open(path, "w") as f:
        f.write(str(n.to_proto()))
    caffe.set_random_seed(0)
    monkeypatch.chdir(fold_dir)
    net = caffe.Net(path, caffe.TRAIN)
    drawn = collections.Counter(int(net.forward()["data"][0, 0, 0, 0]) for _ in range(36))
    assert drawn == {1: 12, 2: 12, 3: 12}
