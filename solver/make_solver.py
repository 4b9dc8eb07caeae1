"""The solver of one fold: SPEC §4's Adam schedule, sized from that fold's data.

One epoch is the number of augmented training images of the fold (the rows of the HDF5 files that
DATA/fold<k>/train.txt lists), divided by the images per update (batch_size x iter_size). From it and a
profile of solver/profiles.py:

  type Adam, base_lr, momentum, momentum2, delta          (paper.py; the profile may set base_lr, momentum2)
  lr_policy step, gamma 0.9, stepsize = ceil(epoch / 4)   (or the profile's "stepsize"; or lr_policy poly)
  weight_decay 5e-4, iter_size                            (iter_size 1 unless the profile sets it)
  max_iter = epochs x epoch                               (or the profile's "max_iter")
  snapshot = every epoch                                  (or the profile's "snapshot")
  solver_mode CPU / GPU, random_seed

Paths: `net` and `snapshot_prefix` are written as given; the driver passes absolute paths, so
`caffe train -solver RUN/solver.prototxt [-weights W]` works from any directory, except that the HDF5
lists inside the net (train.txt) are relative to DATA/fold<k>: run caffe with that as its cwd, e.g.
`cd DATA/fold0 && caffe train -solver /abs/RUN/solver.prototxt`.

CLI: python3 -m solver.make_solver --data DATA --fold K --run RUN [--profile P] [--gpu]
writes RUN/solver.prototxt (the train net must be at RUN/train.prototxt; tools/train.py writes both).
"""
import argparse
import math
import os

from caffe.proto import caffe_pb2
from google.protobuf import text_format

import atomic
import paper
from data_prep import hdf5_io
from solver import profiles


def count_images(list_path, base=None):
    """Total rows of 'data' over the HDF5 files of a list (= images Caffe iterates per pass; a file listed
    twice counts twice); base: the folder its paths are relative to (hdf5_io.read_list)."""
    paths = hdf5_io.read_list(list_path, base)
    rows = {path: hdf5_io.count_images(path) for path in set(paths)}
    return sum(rows[path] for path in paths)


def epoch_size(data_dir, fold, images_per_iteration=paper.BATCH_SIZE, list_path=None):
    """Iterations (solver updates) of one epoch for DATA/fold<k> at `images_per_iteration` (batch x iter_size);
    list_path: the list the train net reads, when not the fold's train.txt (tools/sampling.py); its paths are
    relative to DATA/fold<k>, Caffe's cwd, as train.txt's."""
    fold_dir = os.path.join(data_dir, "fold%d" % fold)
    list_path = list_path or os.path.join(fold_dir, "train.txt")
    images = count_images(list_path, base=fold_dir)
    if images == 0:
        raise ValueError("%s lists no training images" % list_path)
    return int(math.ceil(images / float(images_per_iteration)))


def schedule(epoch, profile="paper"):
    """(max_iter, stepsize, snapshot, validate_every) of a profile for an epoch of `epoch` iterations."""
    p = profiles.settings(profile) if isinstance(profile, str) else profile
    max_iter = p.get("max_iter") or int(p["epochs"] * epoch)
    stepsize = p.get("stepsize") or int(math.ceil(epoch / float(p["lr_steps_per_epoch"])))
    snapshot = p.get("snapshot") or (epoch if p.get("max_iter") is None else max_iter)
    validate_every = p.get("validate_every") or max(1, int(math.ceil(epoch / float(p["validations_per_epoch"]))))
    return int(max_iter), int(stepsize), int(min(snapshot, max_iter)), int(min(validate_every, max_iter))


def solver_parameter(train_net, epoch, snapshot_prefix, profile="paper", gpu=False, seed=paper.SEED,
                     max_iter=None, display=20):
    """SolverParameter for `epoch` iterations per epoch under `profile` (a name of solver/profiles.py or a
    settings dict; max_iter overrides the profile)."""
    p = profiles.settings(profile) if isinstance(profile, str) else profile
    n_iter, stepsize, snapshot, _ = schedule(epoch, p)
    if p["lr_policy"] not in profiles.LR_POLICIES:
        raise ValueError("lr_policy %r not in %s" % (p["lr_policy"], profiles.LR_POLICIES))
    s = caffe_pb2.SolverParameter()
    s.net = train_net
    s.type = paper.SOLVER_TYPE
    s.base_lr = p["base_lr"]
    s.momentum = paper.MOMENTUM
    s.momentum2 = p["momentum2"]
    s.delta = paper.DELTA
    s.lr_policy = p["lr_policy"]
    if p["lr_policy"] == "step":
        s.gamma = p["gamma"]
        s.stepsize = stepsize
    else:
        s.power = p["power"]
    s.weight_decay = paper.WEIGHT_DECAY
    if p["iter_size"] != 1:
        s.iter_size = p["iter_size"]
    s.max_iter = int(max_iter or n_iter)
    s.snapshot = min(snapshot, s.max_iter)
    s.snapshot_prefix = snapshot_prefix
    s.display = display
    s.average_loss = max(1, min(20, display))
    s.random_seed = seed
    s.solver_mode = caffe_pb2.SolverParameter.GPU if gpu else caffe_pb2.SolverParameter.CPU
    return s


def learning_rate(solver_param, iteration):
    """The lr Caffe uses at `iteration`: 'step' base_lr * gamma ^ floor(iter / stepsize), 'poly'
    base_lr * (1 - iter / max_iter) ^ power."""
    if solver_param.lr_policy == "poly":
        return solver_param.base_lr * (1.0 - float(iteration) / solver_param.max_iter) ** solver_param.power
    return solver_param.base_lr * solver_param.gamma ** (iteration // solver_param.stepsize)


def write(path, solver_param, header=""):
    """Write a SolverParameter as prototxt (atomically)."""
    text = text_format.MessageToString(solver_param)
    atomic.write_text(path, (header + "\n" if header else "") + text)


def read(path):
    """Parse a solver prototxt back into a SolverParameter."""
    s = caffe_pb2.SolverParameter()
    with open(path) as f:
        text_format.Merge(f.read(), s)
    return s


def main(argv=None):
    ap = argparse.ArgumentParser(description="Write RUN/solver.prototxt for DATA/fold<k>: SPEC §4's Adam "
                                             "schedule sized from the fold's training images.")
    ap.add_argument("--data", required=True, help="DATA folder (make data)")
    ap.add_argument("--fold", type=int, required=True, help="validation fold k")
    ap.add_argument("--run", required=True, help="run folder; the train net is RUN/train.prototxt")
    ap.add_argument("--profile", default=profiles.DEFAULT_PROFILE, choices=sorted(profiles.PROFILES))
    ap.add_argument("--gpu", action="store_true", help="solver_mode GPU (default CPU)")
    ap.add_argument("--seed", type=int, default=paper.SEED, help="random_seed")
    a = ap.parse_args(argv)
    run = os.path.abspath(a.run)
    epoch = epoch_size(a.data, a.fold)
    s = solver_parameter(os.path.join(run, "train.prototxt"), epoch, os.path.join(run, "snapshots", "ts_fcn"),
                         a.profile, a.gpu, a.seed)
    os.makedirs(os.path.join(run, "snapshots"), exist_ok=True)
    out = os.path.join(run, "solver.prototxt")
    write(out, s, "# profile %s, fold %d, epoch %d iterations; run caffe with cwd %s/fold%d"
          % (a.profile, a.fold, epoch, os.path.abspath(a.data), a.fold))
    print("%s: epoch %d, max_iter %d, stepsize %d, snapshot %d" % (out, epoch, s.max_iter, s.stepsize, s.snapshot))


if __name__ == "__main__":
    main()
