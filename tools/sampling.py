"""How a training run draws its images from the fold's list (DATA/fold<k>/train.txt, one HDF5 file per
augmented image, each patient's files in a folder of their own: data_prep/make_data.py).

  image     the list as it is: every augmented image once per epoch, so a patient counts with its number
            of tumor slices (the report's; a 4-slice tumor is 1.8 % of the demo cohort's training images)
  patient   every training patient equally often: each patient's files are repeated up to the largest
            patient's count (whole repeats, then a seeded choice of distinct files for the remainder), so
            one epoch shows each patient as many images as the patient with the most slices has; the unit
            is the file (make_data writes one image per file)

Caffe's HDF5Data layer shuffles the list's order every pass, so a repeated file is drawn that many times
more often; nothing else of the net changes. `train_source` writes the run's list and names the source the
train net reads.
"""
import collections
import os

import numpy as np

import atomic
from data_prep import hdf5_io

SAMPLINGS = ("image", "patient")
DEFAULT_SAMPLING = "image"
BALANCED_LIST = "train_patient_balanced.txt"


def patient_key(path):
    """The patient a listed file belongs to: its folder for make_data's one-image files (z0012_a3.h5 in
    patients/<id>_aug/), else the file itself (one file holding a patient's images)."""
    path = os.path.normpath(path)
    if hdf5_io.AUGMENTED_FILE_RE.match(os.path.basename(path)):
        return os.path.dirname(path)
    return path


def by_patient(paths):
    """The listed files grouped by patient (patient_key), in the list's order."""
    groups = collections.OrderedDict()
    for path in paths:
        groups.setdefault(patient_key(path), []).append(path)
    return groups


def patient_balanced(paths, seed=0):
    """`paths` with each patient's files repeated to the same count, the largest patient's: whole repeats of
    its files, then as many distinct files as the remainder needs, chosen with `seed`."""
    groups = by_patient(paths)
    if not groups:
        return []
    target = max(len(files) for files in groups.values())
    rng = np.random.RandomState(seed)
    out = []
    for files in groups.values():
        repeats, extra = divmod(target, len(files))
        out += files * repeats + [files[i] for i in sorted(rng.choice(len(files), extra, replace=False))]
    return out


def train_source(fold_dir, run, sampling=DEFAULT_SAMPLING, seed=0):
    """The HDF5 list the run's train net reads: "train.txt" (relative to fold_dir, Caffe's cwd) for "image";
    for "patient" RUN/train_patient_balanced.txt, written atomically, whose lines are train.txt's: relative
    to fold_dir (Caffe splits a list at whitespace, so an absolute path under a folder with a space in its
    name would not be read)."""
    if sampling not in SAMPLINGS:
        raise ValueError("sampling must be one of %s, not %r" % (SAMPLINGS, sampling))
    if sampling == "image":
        return "train.txt"
    paths = hdf5_io.list_lines(os.path.join(fold_dir, "train.txt"))
    out = os.path.join(run, BALANCED_LIST)
    atomic.write_text(out, "".join(p + "\n" for p in patient_balanced(paths, seed)))
    return out
