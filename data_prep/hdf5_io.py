"""Per-patient HDF5 files that Caffe's HDF5Data layer reads (the DATA layout of the contract).

Datasets: `data` float32 (N, 3, 100, 100), `label` float32 (N, 1, 100, 100) in {0, 1}, `slice` int32
(N,) (the source slice index of each image, to rebuild 3D Dice). Uncompressed and contiguous (Caffe's
HDF5Data reads them through the HDF5 lite API). Attributes carry provenance such as the params hash
that makes `make data` idempotent. Files are written atomically: a temporary name beside the target,
then a rename (atomic.atomic_path), so an interrupted run never leaves a half-written file.

Augmented training images go to a folder per patient, one file per image (`write_augmented`: z<slice>_a<k>.h5,
k the augmentation). Caffe's HDF5Data reads one file at a time and shuffles the order of the files and of the
rows within each file only: with one file per patient, batch-1 training would see one patient's hundreds of
images in a row; with one file per slice, the 8 rotations and mirrors of one slice in a row (8 correlated
updates, which made the validation Dice swing). One file per image makes the training order a uniform shuffle.
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


IMAGE_FILE = "z%04d_a%d.h5"
# this layout's names, and the one-file-per-slice names of earlier versions (z0012.h5), removed as stale
AUGMENTED_FILE_RE = re.compile(r"^z(\d{4,})(?:_a(\d+))?\.h5$")


def augmented_files(folder) -> List[str]:
    """The files of an augmented folder, sorted by slice, then augmentation (names only)."""
    if not os.path.isdir(folder):
        return []
    keys = {}
    for name in os.listdir(folder):
        m = AUGMENTED_FILE_RE.match(name)
        if m:
            keys[name] = (int(m.group(1)), int(m.group(2) or -1))
    return sorted(keys, key=keys.get)


def augmented_names(slices, per_slice) -> List[str]:
    """The file names write_augmented gives `per_slice` images of each of `slices`, in augmented_files' order."""
    return [IMAGE_FILE % (int(z), k) for z in sorted(set(int(z) for z in slices)) for k in range(per_slice)]


def write_augmented(folder, data, label, slices, attrs: Optional[Dict] = None) -> List[str]:
    """Write augmented images to `folder`, one file per image (z<slice>_a<k>.h5, k counting the images of
    that slice in order); files not written now (an earlier run, an older layout) are removed. Returns the
    file names."""
    slices = np.asarray(slices)
    os.makedirs(folder, exist_ok=True)
    names = []
    for z in np.unique(slices):
        for k, row in enumerate(np.flatnonzero(slices == z)):
            name = IMAGE_FILE % (int(z), k)
            write_patient_h5(os.path.join(folder, name), data[row:row + 1], label[row:row + 1],
                             slices[row:row + 1], attrs)
            names.append(name)
    for stale in set(augmented_files(folder)) - set(names):
        os.remove(os.path.join(folder, stale))
    return names


def read_augmented(folder) -> Dict[str, np.ndarray]:
    """The datasets of an augmented folder, concatenated in slice order."""
    parts = [read_patient_h5(os.path.join(folder, n)) for n in augmented_files(folder)]
    return {name: np.concatenate([p[name] for p in parts]) for name in DATASETS}


def list_lines(list_path) -> List[str]:
    """The entries of a Caffe HDF5Data list as written (one per line, blank lines skipped)."""
    with open(list_path) as f:
        return [line.strip() for line in f if line.strip()]


def read_list(list_path, base=None) -> List[str]:
    """The HDF5 paths of a Caffe HDF5Data list (train.txt, val.txt), resolved against `base`: Caffe resolves
    them against its cwd, which tools/train.py makes DATA/fold<k>; default the list's own folder."""
    base = base or os.path.dirname(os.path.abspath(list_path))
    return [os.path.normpath(os.path.join(base, line)) for line in list_lines(list_path)]


def count_images(path) -> int:
    with h5py.File(path, "r") as f:
        return int(f["data"].shape[0])
