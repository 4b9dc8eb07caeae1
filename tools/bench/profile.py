"""Where the time goes: the per-stage profile of a training iteration and of the deploy forward, against
the ceiling (the stage's FLOPs at the sgemm GFLOP/s of the same BLAS).

Training, through pycaffe on the real train net (the Python loss, the `paper` solver):
  layers      each layer's forward and backward: net._forward(i, i) / net._backward(i, i), median of runs;
              this includes the data layer (HDF5Data) and the Python loss layer
  solver      solver.apply_update() (Caffe's ApplyUpdate: per parameter regularisation and the Adam update
              value, then net->Update()) timed on three solvers of the same net: Adam with the report's
              weight decay, Adam with weight_decay 0 (Caffe skips the regularisation when the decay is 0)
              and SGD (momentum, weight_decay 0). Derived split:
                regularisation = Adam(decay) - Adam(no decay)
                apply (net->Update, data -= diff) ~ regularisation x all parameters / decayed parameters:
                  both are one caffe_axpy over the parameters (the regularisation over the weights with a
                  decay_mult, net->Update over every parameter), the same BLAS call on the same sizes
                Adam update value = Adam(no decay) - apply
              SGD(no decay) is the cheapest update Caffe has on the same machinery (context).
  rest        solver.step(1) - layers - apply_update: clearing the parameter diffs (timed alone as
              net.clear_param_diffs()), the loss smoothing, pycaffe's glue
Deploy: each layer's forward at batch 1. `make segment`'s parts come from its own summary (stages.py).
"""
import functools
import time

from tools.bench import nets
from tools.bench.common import median, timed_runs


def layer_split(net, repeat, backward=True):
    """{layer: {type, forward_s[, backward_s]}} in net order: medians of `repeat` runs of each layer's
    forward (and backward) alone, after one warm-up pass."""
    names = list(net._layer_names)
    types = [layer.type for layer in net.layers]
    fwd = {n: [] for n in names}
    bwd = {n: [] for n in names}
    for run in range(repeat + 1):
        for i, n in enumerate(names):
            t = time.perf_counter()
            net._forward(i, i)
            if run:
                fwd[n].append(time.perf_counter() - t)
        if not backward:
            continue
        for i in reversed(range(len(names))):
            t = time.perf_counter()
            net._backward(i, i)
            if run:
                bwd[names[i]].append(time.perf_counter() - t)
    out = {}
    for n, kind in zip(names, types):
        out[n] = {"type": kind, "forward_s": median(fwd[n])}
        if backward:
            out[n]["backward_s"] = median(bwd[n])
    return out


def _ceilings(layers, flops, sgemm_gflops):
    """Add forward/backward_ceiling_s (the layer's FLOPs / sgemm GFLOP/s) to the GEMM layers."""
    if not sgemm_gflops:
        return
    for name, f in flops["layers"].items():
        if name in layers:
            layers[name]["forward_ceiling_s"] = f["forward_gflop"] / sgemm_gflops
            if "backward_s" in layers[name]:
                layers[name]["backward_ceiling_s"] = (f["train_gflop"] - f["forward_gflop"]) / sgemm_gflops


def _parameter_counts(net, prototxt):
    """(all parameters, parameters that Caffe's L2 regularisation touches: decay_mult != 0)."""
    mults = nets.lr_mults(nets.read_netparam(prototxt))
    total = decayed = 0
    for name, blobs in net.params.items():
        for i, blob in enumerate(blobs):
            total += blob.count
            m = mults.get(name) or []
            if (m[i][1] if i < len(m) else 1.0) != 0:
                decayed += blob.count
    return total, decayed


def _apply_update_s(ctx, **solver_fields):
    solver = nets.make_solver(ctx, "python", fill=False, **solver_fields)
    try:
        return median(timed_runs(solver.apply_update, ctx.repeat, 1))
    finally:
        del solver


def solver_split(ctx, solver):
    """The solver's parts (see the module docstring); `solver` is the real Adam solver of the run."""
    prototxt, _ = nets.train_net_files(ctx.tmp, "python", ctx.fc_channels)
    total, decayed = _parameter_counts(solver.net, prototxt)
    adam = median(timed_runs(solver.apply_update, ctx.repeat, 1))
    adam_no_decay = _apply_update_s(ctx, weight_decay=0.0)
    sgd_no_decay = _apply_update_s(ctx, type="SGD", weight_decay=0.0)
    regularisation = max(0.0, adam - adam_no_decay)
    apply = min(adam_no_decay, regularisation * total / decayed) if decayed else None
    return {"apply_update_adam_s": adam, "apply_update_adam_no_decay_s": adam_no_decay,
            "apply_update_sgd_no_decay_s": sgd_no_decay, "parameters": int(total),
            "decayed_parameters": int(decayed), "regularisation_s": regularisation, "apply_s": apply,
            "adam_update_s": (adam_no_decay - apply) if apply is not None else None}


def stage_profile(ctx):
    flops = ctx.flops or nets.count_flops(*nets.deploy_net(ctx))
    sgemm = ctx.results.get("sgemm_gflops")
    solver = nets.make_solver(ctx, "python")
    solver.step(1)   # allocations, the first HDF5 read
    train_layers = layer_split(solver.net, ctx.repeat)
    _ceilings(train_layers, flops, sgemm)
    step = median(timed_runs(functools.partial(solver.step, 1), ctx.repeat, ctx.warmup))
    clear = median(timed_runs(solver.net.clear_param_diffs, ctx.repeat, 1))
    parts = solver_split(ctx, solver)
    del solver
    fwd = sum(l["forward_s"] for l in train_layers.values())
    bwd = sum(l["backward_s"] for l in train_layers.values())
    python_loss = [l for l in train_layers.values() if l["type"] == "Python"]
    data_layers = [l for l in train_layers.values() if l["type"] in nets.DATA_LAYERS]

    _, deploy = nets.deploy_net(ctx)
    x, _ = nets.bench_input(1)
    deploy.blobs["data"].data[...] = x
    deploy_layers = layer_split(deploy, ctx.repeat, backward=False)
    _ceilings(deploy_layers, flops, sgemm)
    del deploy
    ceiling = (lambda gflop: gflop / sgemm) if sgemm else (lambda gflop: None)
    return {"profile": {
        "train_step_s": step, "train_ceiling_s": ceiling(flops["train_gflop"]),
        "layers_forward_s": fwd, "layers_backward_s": bwd,
        "layers_forward_ceiling_s": ceiling(flops["forward_gflop"]),
        "layers_backward_ceiling_s": ceiling(flops["train_gflop"] - flops["forward_gflop"]),
        "python_loss_s": sum(l["forward_s"] + l["backward_s"] for l in python_loss) if python_loss else None,
        "data_layer_s": sum(l["forward_s"] for l in data_layers) if data_layers else None,
        "clear_param_diffs_s": clear,
        "solver": parts,
        "step_rest_s": step - fwd - bwd - parts["apply_update_adam_s"],
        "train_layers": train_layers,
        "deploy_forward_s": sum(l["forward_s"] for l in deploy_layers.values()),
        "deploy_ceiling_s": ceiling(flops["forward_gflop"]),
        "deploy_layers": deploy_layers,
    }}

