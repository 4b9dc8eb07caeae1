"""Per-patient HDF5 files that Caffe's HDF5Data layer reads (the DATA layout of the contract).

Datasets: `data` float32 (N, 3, 100, 100), `label` float32 (N, 1, 100, 100) in {0, 1}, `slice` int32
(N,) (the source slice index of each image, to rebuild 3D Dice). Uncompressed and contiguous (Caffe's
HDF5Data reads them through the HDF5 lite API). Attributes carry provenance such as the params hash
that makes `make data` idempotent. Files are written atomically: a temporary name beside the target,
then a rename (atomic.atomic_path), so an interrupted run never leaves a half-written file.

Augmented training images go to a folder per patient, one file per source slice holding its
paper.AUGMENTATIONS images (`write_augmented`). Caffe's HDF5Data reads one file at a time and shuffles
the order of the files and of the rows within each file only: with one file per patient, batch-1
training would see one patient's hundreds of images in a row, then the next patient's. One file per
slice shuffles the training order across patients.
"""
import os
import re
from typing import Dict, List, Optional

import h5py
import numpy as np

import atomic

DATASETS = ("data", "label", "slice")


def write_patient_h5(path, data, label, slices, attrs: Optional[Dict] = None) -> None:
    """Write data (N,3,H,W), label (N,H,W) or (N,1,H,W) and slices (N,) to `path`, atomically."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    label = np.asarray(label, dtype=np.float32)
    if label.ndim == 3:
        label = label[:, None]
    label = np.ascontiguousarray(label)
    slices = np.ascontiguousarray(slices, dtype=np.int32)
    n = data.shape[0]
    if data.ndim != 4 or label.shape != (n, 1) + data.shape[2:] or slices.shape != (n,):
        raise ValueError("inconsistent shapes data %s label %s slice %s"
                         % (data.shape, label.shape, slices.shape))
    with atomic.atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("data", data=data)
            f.create_dataset("label", data=label)
            f.create_dataset("slice", data=slices)
            for key, value in (attrs or {}).items():
                f.attrs[key] = value


def read_patient_h5(path) -> Dict[str, np.ndarray]:
    """{'data', 'label', 'slice', 'attrs'} of a file written by write_patient_h5."""
    with h5py.File(path, "r") as f:
        out = {name: f[name][()] for name in DATASETS}
        out["attrs"] = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    return out


def read_attrs(path) -> Dict:
    """The attributes only, or {} when the file is missing or unreadable (e.g. truncated)."""
    try:
        with h5py.File(path, "r") as f:
            if any(name not in f for name in DATASETS):
                return {}
            return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    except (OSError, KeyError):
        return {}


SLICE_FILE = "z%04d.h5"
SLICE_FILE_RE = re.compile(r"^z\d{4,}\.h5$")


def augmented_files(folder) -> List[str]:
    """The per-slice files of an augmented folder, sorted by slice (names only)."""
    if not os.path.isdir(folder):
        return []
    return sorted(n for n in os.listdir(folder) if SLICE_FILE_RE.match(n))


def write_augmented(folder, data, label, slices, attrs: Optional[Dict] = None) -> List[str]:
    """Write augmented images to `folder`, one file per source slice (all rows of that slice);
    files of slices not in `slices` (an earlier run) are removed. Returns the file names."""
    slices = np.asarray(slices)
    os.makedirs(folder, exist_ok=True)
    names = []
    for z in np.unique(slices):
        rows = np.flatnonzero(slices == z)
        name = SLICE_FILE % int(z)
        write_patient_h5(os.path.join(folder, name), data[rows], label[rows], slices[rows], attrs)
        names.append(name)
    for stale in set(augmented_files(folder)) - set(names):
        os.remove(os.path.join(folder, stale))
    return names


def read_augmented(folder) -> Dict[str, np.ndarray]:
    """The datasets of an augmented folder, concatenated in slice order."""
    parts = [read_patient_h5(os.path.join(folder, n)) for n in augmented_files(folder)]
    return {name: np.concatenate([p[name] for p in parts]) for name in DATASETS}


def count_images(path) -> int:
    with h5py.File(path, "r") as f:
        return int(f["data"].shape[0])
