"""Test helper: a tiny DATA folder in the contract's layout (manifest, patients/*.h5, fold<k>/*.txt).

Used by the TRAIN tests before (and independently of) data_prep.make_data: random images with a
bright square 'tumor' whose label is the square, so a net can learn it.
"""
import json
import os

import h5py
import numpy as np

import paper


def make(root, patients=5, slices=3, folds=5, size=paper.INPUT_SIZE, seed=0, aug=paper.AUGMENTATIONS):
    """Write DATA at `root`; fold k validates patient k (one patient per fold when patients == folds)."""
    rng = np.random.RandomState(seed)
    os.makedirs(os.path.join(root, "patients"), exist_ok=True)
    ids = ["P%03d" % (i + 1) for i in range(patients)]
    fold_of = {pid: i % folds for i, pid in enumerate(ids)}
    entries = []
    for pid in ids:
        for suffix, n in (("", slices), ("_aug", slices * aug)):
            data = rng.normal(0, 10, (n, 3, size, size)).astype(np.float32)
            label = np.zeros((n, 1, size, size), np.float32)
            for i in range(n):
                r, c = rng.randint(size // 3, size // 2, 2)
                s = rng.randint(size // 6, size // 3)
                label[i, 0, r:r + s, c:c + s] = 1
            data += 60 * label
            with h5py.File(os.path.join(root, "patients", pid + suffix + ".h5"), "w") as f:
                f["data"] = data
                f["label"] = label
                f["slice"] = np.repeat(np.arange(slices, dtype=np.int32), n // slices)
        entries.append({"id": pid, "slices": slices, "box_side": 100, "box_center": [50, 50],
                        "spacing": [1, 1, 1], "source_kind": "nifti",
                        "h5": "patients/%s.h5" % pid, "h5_aug": "patients/%s_aug.h5" % pid})
    fold_lists = [[p for p in ids if fold_of[p] == k] for k in range(folds)]
    for k in range(folds):
        d = os.path.join(root, "fold%d" % k)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "train.txt"), "w") as f:
            f.writelines("../patients/%s_aug.h5\n" % p for p in ids if fold_of[p] != k)
        with open(os.path.join(d, "val.txt"), "w") as f:
            f.writelines("../patients/%s.h5\n" % p for p in fold_lists[k])
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump({"params": {}, "folds": fold_lists, "patients": entries}, f)
    return root
