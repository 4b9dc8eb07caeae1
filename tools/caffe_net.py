"""Running a TS-FCN net in pycaffe, and the run folder it comes from.

This module owns:
  * the device: `use_device(gpu)` is the one place that calls caffe.set_mode_cpu/gpu, and refuses with
    one line a GPU on a CPU-only Caffe build (which would abort the process on the first GPU call);
  * opening a net with its weights on a device (`open_net`), in the TEST phase; with weights, the
    prototxt's random fillers are dropped first (`without_fillers`: Caffe would fill fc6/fc7's 55 M
    numbers only for the caffemodel to overwrite them) and a layer the caffemodel leaves empty is refused;
  * the batched forward (`forward`): N images through the net in balanced batches, the blobs asked for
    written straight into one array each;
  * reading a run folder of tools/train.py: RUN/run.json (`run_info`), the DATA manifest it names
    (`read_manifest`, `run_manifest`), the snapshots (`snapshot_prefix`, `latest_solverstate`, `average_path`), the
    narrow start's own run folder (`narrow_run`) and the run
    a caffemodel belongs to (`model_run`).

Caffe is imported inside the functions, so the run-folder readers work where Caffe is absent (the Slurm
submit host) and importing this module costs nothing.
"""
import contextlib
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

import atomic

SNAPSHOT_NAME = "ts_fcn"


class NetError(Exception):
    """A net or model that cannot be opened as asked; one clear line."""


# --- device ---------------------------------------------------------------------------------------
def cuda_build():
    """True when this pycaffe was built with CUDA (CPU-only builds abort on any GPU call)."""
    import caffe
    try:
        out = subprocess.run(["ldd", caffe._caffe.__file__], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             universal_newlines=True).stdout
    except OSError:
        return False
    return "libcudart" in out


def use_device(gpu=None):
    """caffe.set_mode_cpu(), or set_device(gpu) + set_mode_gpu(); returns "CPU" or "GPU <id>". SystemExit
    with one line when a GPU is asked of a CPU-only Caffe."""
    import caffe
    if gpu is None:
        caffe.set_mode_cpu()
        return "CPU"
    if not cuda_build():
        raise SystemExit("error: --gpu %s asked for, but this Caffe (%s) is a CPU-only build; run without "
                         "--gpu, or build Caffe with CUDA (make caffe-cuda)" % (gpu, caffe._caffe.__file__))
    caffe.set_device(int(gpu))
    caffe.set_mode_gpu()
    return "GPU %s" % gpu


# --- opening a net --------------------------------------------------------------------------------
@contextlib.contextmanager
def without_fillers(prototxt):
    """The prototxt without its random weight/bias fillers, as a temporary file.

    Caffe fills every parameter when it builds a net, before the caffemodel overwrites them; the random
    fillers of fc6/fc7 (55 M numbers) cost ~1.5 s per start. Without them the parameters start at zero
    and then hold the caffemodel's values (open_net refuses a model that leaves a layer's weights at
    zero). The fixed bilinear upsampling filler is kept.
    """
    from caffe.proto import caffe_pb2
    from google.protobuf import text_format
    net = caffe_pb2.NetParameter()
    try:
        with open(str(prototxt)) as f:
            text_format.Merge(f.read(), net)
    except text_format.ParseError as e:
        raise NetError("prototxt %s does not parse: %s" % (prototxt, " ".join(str(e).split())))
    for layer in net.layer:
        for field in ("convolution_param", "inner_product_param"):
            if layer.HasField(field):
                param = getattr(layer, field)
                for filler in ("weight_filler", "bias_filler"):
                    if param.HasField(filler) and getattr(param, filler).type != "bilinear":
                        param.ClearField(filler)
    fd, path = tempfile.mkstemp(prefix="net-", suffix=".prototxt")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text_format.MessageToString(net))
        yield path
    finally:
        os.remove(path)


def open_net(prototxt, weights=None, gpu=None):
    """A TEST-phase caffe.Net of `prototxt` on the device (use_device), with the caffemodel `weights`
    (read once) or, without, with the prototxt's fillers."""
    import caffe
    use_device(gpu)
    if weights is None:
        return caffe.Net(str(prototxt), caffe.TEST)
    with without_fillers(prototxt) as lean:
        net = caffe.Net(lean, caffe.TEST, weights=str(weights))
    empty = [name for name, blobs in net.params.items() if not np.any(blobs[0].data)]
    if empty:
        raise NetError("model %s has no weights for layer(s) %s of the net"
                       % (os.path.basename(str(weights)), ", ".join(empty)))
    return net


def set_batch(net, n):
    """Reshape the net's `data` input to n images (nothing when it holds n already)."""
    data = net.blobs["data"]
    if data.data.shape[0] != n:
        data.reshape(n, *data.data.shape[1:])
        net.reshape()


# --- the batched forward --------------------------------------------------------------------------
def forward(net, images, blobs=("prob",), batch=None, channel=None, progress=None):
    """Forward N images (N x C x H x W) through `net`; {blob: N x ... float32 array}.

    The images go in balanced batches of at most `batch` (default: the net's input batch), each blob's
    output written into one array (with `channel`, only that channel of axis 1: N x H x W). On the CPU
    Caffe loops over a batch's images one by one, so the batch size never changes a result. The net's
    input batch is restored afterwards. progress: a tqdm description, or None for no bar.
    """
    images = np.asarray(images, dtype=np.float32)
    n = len(images)
    size0 = net.blobs["data"].data.shape[0]
    chunks = -(-n // max(1, int(batch or size0))) if n else 0
    size = -(-n // chunks) if chunks else 0
    out = {}
    bar = None
    if progress is not None:
        from tqdm import tqdm
        bar = tqdm(total=n, desc=progress, unit="slice", file=sys.stderr, leave=False)
    try:
        for start in range(0, n, max(1, size)):
            part = images[start:start + size]
            set_batch(net, len(part))
            net.blobs["data"].data[...] = part
            net.forward()
            for k in blobs:
                got = net.blobs[k].data if channel is None else net.blobs[k].data[:, channel]
                if k not in out:
                    out[k] = np.empty((n,) + got.shape[1:], np.float32)
                out[k][start:start + len(part)] = got
            if bar is not None:
                bar.update(len(part))
    finally:
        if bar is not None:
            bar.close()
        set_batch(net, size0)
    return {k: out.get(k, np.zeros((0,), np.float32)) for k in blobs}


# --- the run folder -------------------------------------------------------------------------------
def narrow_run(run):
    """The run folder of RUN's narrow start (tools/train.py), whether or not there is one."""
    return os.path.join(run, "narrow")


def run_info(run):
    """RUN/run.json written by tools/train.py (profile, data, net options, decision rule, ...); {} when absent."""
    path = os.path.join(run, "run.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def read_manifest(data_dir):
    """DATA/manifest.json of `make data` (params, folds, patients); SystemExit with one line when absent."""
    path = os.path.join(data_dir, "manifest.json")
    if not os.path.exists(path):
        raise SystemExit("error: %s not found; make it with `make data`" % path)
    with open(path) as f:
        return json.load(f)


def run_manifest(info):
    """The DATA manifest a run.json (`info`) names, or None when it names none or the file is gone."""
    path = os.path.join(info.get("data") or "", "manifest.json")
    if not info.get("data") or not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def merge_json(path, update):
    """Merge `update` into the JSON object at path (RUN/metrics.json), atomically; returns the result."""
    old = {}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    old.update(update)
    atomic.write_json(path, old)
    return old


def model_run(model):
    """The run folder a caffemodel lies in (RUN/final.caffemodel or RUN/snapshots/*.caffemodel: the folder
    holding run.json), or None."""
    folder = os.path.dirname(os.path.abspath(model))
    for run in (folder, os.path.dirname(folder)):
        if os.path.isfile(os.path.join(run, "run.json")):
            return run
    return None


def snapshot_prefix(run):
    """RUN/snapshots/ts_fcn: Caffe's snapshot_prefix of the run."""
    return os.path.join(os.path.abspath(run), "snapshots", SNAPSHOT_NAME)


def snapshot_iteration(path):
    """The iteration of a snapshot file name (..._iter_N.solverstate/.caffemodel), or -1."""
    m = re.search(r"_iter_(\d+)\.(solverstate|caffemodel)$", path)
    return int(m.group(1)) if m else -1


def snapshot_path(run, iteration, ext):
    """RUN/snapshots/ts_fcn_iter_N.<ext>: ext "caffemodel" or "solverstate" (Caffe's), "average.caffemodel"."""
    return "%s_iter_%d.%s" % (snapshot_prefix(run), iteration, ext)


def snapshot_iterations(run):
    """The iterations of RUN's complete snapshots (solverstate and caffemodel), ascending."""
    states = glob.glob(snapshot_prefix(run) + "_iter_*.solverstate")
    return sorted(it for it in map(snapshot_iteration, states)
                  if os.path.exists(snapshot_path(run, it, "caffemodel")))


def latest_solverstate(run):
    """The RUN/snapshots/*.solverstate with the highest iteration (whose caffemodel exists), or None."""
    iterations = snapshot_iterations(run)
    return snapshot_path(run, iterations[-1], "solverstate") if iterations else None


def prune_snapshots(run, keep):
    """Deletes every snapshot (caffemodel, solverstate, averaged weights) but the `keep` latest complete ones
    (0 keeps all); returns the iterations deleted. A 4096-channel snapshot is 0.8 GB with its Adam state."""
    if keep <= 0:
        return []
    gone = snapshot_iterations(run)[:-keep]
    for it in gone:
        for ext in ("caffemodel", "solverstate", "average.caffemodel"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(snapshot_path(run, it, ext))
    return gone


def average_path(run, iteration):
    """The averaged weights (tools/averaging.py) saved beside the snapshot of `iteration`."""
    return snapshot_path(run, iteration, "average.caffemodel")
