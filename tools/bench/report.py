"""What a bench run says: derived figures (GFLOP/s, share of the sgemm ceiling, the peer's ratio), the
console table, the rows of the per-stage profile and bench/results.md. Pure Python (no numpy, no Caffe)."""
import os

import atomic
import paper

# The targets of issue 13 (`make bench`, same machine, same run) and the older data target.
TARGETS = {
    "train_iter_s": {"fraction_of_sgemm": 0.5, "peer_ratio": 0.6},
    "forward_s": {"fraction_of_sgemm": 0.7},
    "segment_s": {"seconds": 6.0},
    "data_s_per_patient": {"seconds": 1.0},
}
REPORT_ITER_S = paper.REPORT_HOURS * 3600.0 / paper.REPORT_ITERATIONS
FIGURE = "profile.png"


def derive(r):
    """GFLOP/s and the fraction of the sgemm ceiling of each net figure; the peer's ratios."""
    ceiling = r.get("sgemm_gflops")
    fwd, train = r.get("net_gflop_per_image"), r.get("net_train_gflop_per_image")
    eff = {}
    for key, gflop in (("train_iter_s", train), ("train_iter_infogain_s", train),
                       ("forward_s", fwd), ("forward_b16_s", fwd)):
        s = r.get(key)
        if s and gflop:
            g = gflop / s
            eff[key] = {"gflops": g, "fraction_of_sgemm": (g / ceiling) if ceiling else None}
    r["efficiency"] = eff
    peer = r.get("peer") or {}
    if peer.get("status") == "ok":
        for ours, theirs in (("train_iter_s", "train_iter_s"), ("forward_s", "forward_s")):
            if r.get(ours) and peer.get(theirs):
                peer.setdefault("ratios", {})[ours] = r[ours] / peer[theirs]
    r["targets_met"] = targets_met(r)
    return r


def targets_met(r):
    """{key: True/False} for each target whose figures this run has."""
    out = {}
    for key, target in TARGETS.items():
        checks = []
        if "seconds" in target and r.get(key):
            checks.append(r[key] <= target["seconds"])
        frac = (r.get("efficiency", {}).get(key) or {}).get("fraction_of_sgemm")
        if "fraction_of_sgemm" in target and frac:
            checks.append(frac >= target["fraction_of_sgemm"])
        ratio = ((r.get("peer") or {}).get("ratios") or {}).get(key)
        if "peer_ratio" in target and ratio:
            checks.append(ratio <= target["peer_ratio"])
        if checks:
            out[key] = all(checks)
    return out


def target_text(key):
    t = TARGETS.get(key) or {}
    parts = []
    if "seconds" in t:
        parts.append("≤ %g s" % t["seconds"])
    if "fraction_of_sgemm" in t:
        parts.append("≥ %d %% of ceiling" % round(100 * t["fraction_of_sgemm"]))
    if "peer_ratio" in t:
        parts.append("≤ %g × PyTorch" % t["peer_ratio"])
    return ", ".join(parts)


ROWS = [  # key, label, unit
    ("train_iter_s", "training iteration, Python loss (batch 1, fwd+loss+bwd+Adam)", "s"),
    ("train_iter_infogain_s", "training iteration, InfogainLoss", "s"),
    ("train_iter_narrow_s", "training iteration of the fast profile's narrow start (fc6/fc7 {narrow} channels)", "s"),
    ("forward_s", "deploy forward, batch 1", "s/image"),
    ("forward_b16_s", "deploy forward, batch 16", "s/image"),
    ("data_s_per_patient", "make data, one {data_slices}-slice phantom patient", "s"),
    ("data_read_s", "  reading / decoding DICOM", "s"),
    ("data_preprocess_s", "  preprocessing (box, crop, window, 8x augment)", "s"),
    ("data_hdf5_s", "  HDF5 writing", "s"),
    ("segment_s", "make segment, {segment_slices} tumor slices (whole command)", "s"),
    ("sgemm_gflops", "sgemm 1024^3 (the ceiling)", "GFLOP/s"),
    ("net_gflop_per_image", "net forward FLOPs per image (from the prototxt)", "GFLOP"),
    ("net_train_gflop_per_image", "net training FLOPs per image (fwd + both gradients)", "GFLOP"),
]


def _fmt(v, unit):
    if v is None:
        return "n/a"
    if unit in ("GFLOP/s", "GFLOP"):
        return "%.1f" % v
    return "%.3f" % v if v < 10 else "%.1f" % v


def rows(r):
    """(label, value, ceiling share, target, met, why n/a) for each figure this run has."""
    out = []
    for key, label, unit in ROWS:
        if key not in r:  # a stage not asked for (--only)
            continue
        v = r.get(key)
        eff = r.get("efficiency", {}).get(key)
        ceil = ("%.0f GFLOP/s, %.0f%%" % (eff["gflops"], 100 * eff["fraction_of_sgemm"])
                if eff and eff.get("fraction_of_sgemm") else "")
        met = r.get("targets_met", {}).get(key)
        why = r.get("not_available", {}).get(key, "")
        label = label.format(data_slices=r.get("data_slices") or "?", segment_slices=r.get("segment_slices") or "?",
                             narrow=r.get("narrow_fc_channels") or "?")
        out.append((label, _fmt(v, unit) + ("" if v is None else " " + unit), ceil, target_text(key),
                    "" if met is None else ("yes" if met else "no"), why))
    return out


# --- the per-stage profile ---------------------------------------------------------------------------

def _other(layers, key, names):
    return sum(l.get(key) or 0.0 for n, l in layers.items() if n not in names)


def profile_rows(r):
    """[(section, label, seconds, ceiling seconds or None)] of the per-stage profile, for the table and
    the figure. GEMM layers one by one, every other layer summed ("other layers": ReLU, pooling, dropout,
    crop), the Python loss and the data layer apart."""
    p = r.get("profile") or {}
    out = []
    layers = p.get("train_layers") or {}
    if layers:
        sec = "training iteration"
        out.append((sec, "solver.step(1), whole", p["train_step_s"], p.get("train_ceiling_s")))
        gemm = [n for n, l in layers.items() if "forward_ceiling_s" in l]
        special = {n for n, l in layers.items() if l["type"] == "Python" or l["type"] in ("HDF5Data", "Data")}
        for n in layers:
            if n in special and layers[n]["type"] != "Python":
                out.append((sec, "data layer (%s)" % layers[n]["type"], layers[n]["forward_s"], None))
        for n in gemm:
            out.append((sec, "forward %s" % n, layers[n]["forward_s"], layers[n]["forward_ceiling_s"]))
        out.append((sec, "forward, other layers", _other(layers, "forward_s", set(gemm) | special), None))
        for n in layers:
            if layers[n]["type"] == "Python":
                out.append((sec, "Python loss (%s), forward + backward" % n,
                            layers[n]["forward_s"] + layers[n]["backward_s"], None))
        for n in reversed(gemm):
            out.append((sec, "backward %s" % n, layers[n]["backward_s"], layers[n].get("backward_ceiling_s")))
        out.append((sec, "backward, other layers", _other(layers, "backward_s", set(gemm) | special), None))
        s = p.get("solver") or {}
        for key, label in (("regularisation_s", "solver: regularisation (L2 weight decay)"),
                           ("adam_update_s", "solver: Adam update value"),
                           ("apply_s", "solver: apply (net->Update)")):
            if s.get(key) is not None:
                out.append((sec, label, s[key], None))
        out.append((sec, "rest of step (clear diffs %.3f s, glue)" % p.get("clear_param_diffs_s", 0.0),
                    p.get("step_rest_s"), None))
    dl = p.get("deploy_layers") or {}
    if dl:
        sec = "deploy forward, batch 1"
        out.append((sec, "net.forward(), whole", p["deploy_forward_s"], p.get("deploy_ceiling_s")))
        gemm = [n for n, l in dl.items() if "forward_ceiling_s" in l]
        for n in gemm:
            out.append((sec, "forward %s" % n, dl[n]["forward_s"], dl[n]["forward_ceiling_s"]))
        out.append((sec, "forward, other layers", _other(dl, "forward_s", set(gemm)), None))
    seg = r.get("segment_stages_s") or {}
    if seg:
        sec = "make segment, %s slices" % r.get("segment_slices")
        net_ceiling = (r["segment_slices"] * r["net_gflop_per_image"] / r["sgemm_gflops"]
                       if r.get("net_gflop_per_image") and r.get("sgemm_gflops") and r.get("segment_slices") else None)
        out.append((sec, "whole command", r.get("segment_s"), net_ceiling))
        for key, label, ceil in (("start_and_imports", "Python start, imports", None),
                                 ("load_scan", "reading the scan", None), ("load_net", "loading the net", None),
                                 ("crop", "crops to the net input", None), ("net", "forward", net_ceiling),
                                 ("back_map", "back-mapping, threshold", None), ("write", "writing the outputs", None)):
            if key in seg:
                out.append((sec, label, seg[key], ceil))
    return out


def solver_note(r):
    s = (r.get("profile") or {}).get("solver") or {}
    if not s:
        return ""
    return ("The solver's split: `solver.apply_update()` (Caffe's ApplyUpdate) timed on three solvers of the "
            "same net: Adam with the report's weight decay %.3f s, Adam with weight_decay 0 %.3f s (Caffe "
            "skips the L2 step when the decay is 0), SGD with momentum and no decay %.3f s. Regularisation = "
            "the first minus the second; apply (net->Update, `data -= diff`) is one caffe_axpy over all %.1f M "
            "parameters, the same BLAS call as the regularisation over the %.1f M decayed ones, so it is "
            "estimated as the regularisation scaled by that ratio; the Adam update value is the rest of the "
            "no-decay time. Layers are timed one at a time with pycaffe's `net._forward(i, i)` / "
            "`net._backward(i, i)`; the rest of the step is `solver.step(1)` minus the layers and the update."
            % (s["apply_update_adam_s"], s["apply_update_adam_no_decay_s"], s["apply_update_sgd_no_decay_s"],
               s["parameters"] / 1e6, s["decayed_parameters"] / 1e6))


# --- the console table and results.md ------------------------------------------------------------

def _load(r):
    return "%s at the start, %s at the end" % (r.get("loadavg_start"), r.get("loadavg_end"))


def shared_warning(r):
    """A warning when other work shared the machine: a 1-minute load above the CPUs (the bench's own
    threads) plus one. Then every figure, the sgemm ceiling included, is this run's share of the CPUs,
    and parts derived as differences of separately timed runs can even come out negative."""
    cpus = (r.get("machine") or {}).get("cpus_usable") or (r.get("machine") or {}).get("cpus")
    loads = [v for v in (r.get("loadavg_start"), r.get("loadavg_end")) if v is not None]
    if not cpus or not loads or max(loads) <= cpus + 1:
        return ""
    return ("WARNING: the machine was shared (1-min load up to %.1f on %d CPUs): times, the sgemm ceiling and "
            "the shares of it are this run's slice of the CPUs, not the machine's; parts derived as "
            "differences of separately timed runs can come out negative. Compare figures of one run only, "
            "and rerun on an idle machine for the machine's own figures." % (max(loads), cpus))


def table(r):
    m = r.get("machine", {})
    lines = ["TS-FCN bench: %s, %s CPUs, BLAS core %s, %s threads, load %s%s" % (
        m.get("cpu_model"), m.get("cpus"), m.get("blas_core"), m.get("threads_used"), _load(r),
        " (QUICK: not the benchmark)" if r.get("quick") else "")]
    if shared_warning(r):
        lines.append("  " + shared_warning(r))
    for label, val, ceil, target, met, why in rows(r):
        lines.append("  %-62s %16s  %-22s %-40s %s" % (label, val, ceil, (target + (" (%s)" % met if met else "")),
                                                       ("n/a: " + why) if why else ""))
    for line in peer_lines(r):
        lines.append("  " + line)
    if r.get("profile"):
        lines.append("  where the time goes: bench/results.md and the figure %s" % FIGURE)
    lines.append("  report: ~%d h for ~%d k iterations on a 2016 GPU = %.2f s/iteration" % (
        paper.REPORT_HOURS, paper.REPORT_ITERATIONS // 1000, REPORT_ITER_S))
    return "\n".join(lines)


def peer_lines(r):
    """One line per peer figure (or the reason it was skipped)."""
    peer = r.get("peer")
    if not peer:
        return []
    if peer.get("status") == "exported":
        return ["PyTorch peer: exported to %s, not run yet (python3 -m tools.bench.peer_host)" % peer.get("dir")]
    if peer.get("status") != "ok":
        return ["PyTorch peer: skipped (%s)" % peer.get("reason")]
    ratios = peer.get("ratios") or {}
    load = "/".join("%.1f" % v for v in (peer.get("loadavg_start"), peer.get("loadavg")) if v is not None)
    out = ["PyTorch %s peer (%s threads, 1-min load %s): training iteration %.3f s, Caffe/PyTorch %s; forward "
           "%.3f s, Caffe/PyTorch %s; its loss vs Caffe's on the same weights and input: rel. diff %.1e" % (
               peer.get("torch"), peer.get("threads"), load or "?", peer["train_iter_s"],
               "%.2f" % ratios["train_iter_s"] if "train_iter_s" in ratios else "n/a", peer["forward_s"],
               "%.2f" % ratios["forward_s"] if "forward_s" in ratios else "n/a", peer.get("loss_rel_diff", float("nan")))]
    return out


def markdown(r, command):
    m = r.get("machine", {})
    out = ["Measured with `%s` on %s (%s CPUs, BLAS: OpenBLAS core %s, %s threads%s; 1-min load %s), "
           "medians of %d runs after a warm-up%s. FLOPs are counted from the prototxt; the percentage is "
           "the achieved GFLOP/s over the sgemm ceiling of the same BLAS. Compare only figures of one run: "
           "the machine may be shared."
           % (command, m.get("cpu_model"), m.get("cpus"), m.get("blas_core"), m.get("threads_used"),
              ", LD_PRELOAD %s" % m["ld_preload"] if m.get("ld_preload") else "", _load(r), r.get("repeat"),
              " (QUICK: not the benchmark)" if r.get("quick") else ""),
           ""] + (["**%s**" % shared_warning(r), ""] if shared_warning(r) else []) + [
           "| stage | time | GFLOP/s (% of sgemm) | target | met |",
           "|---|---|---|---|---|"]
    for label, val, ceil, target, met, why in rows(r):
        out.append("| %s | %s | %s | %s | %s |" % (label.strip(), val if not why else "n/a (%s)" % why, ceil,
                                                   target, met))
    peer = peer_lines(r)
    if peer:
        out += ["", "**Peer.** " + peer[0] + (". " + r["peer"]["note"] if r["peer"].get("note") else "")]
    prof = profile_rows(r)
    if prof:
        out += ["", "## Where the time goes", "",
                "Ceiling = the stage's FLOPs at the sgemm GFLOP/s above (no ceiling: not GEMM work). "
                "Figure: [%s](%s)." % (FIGURE, FIGURE), "",
                "| part | time (s) | ceiling (s) | % of ceiling | share of the whole |", "|---|---|---|---|---|"]
        whole = None
        for section, label, s, ceil in prof:
            if label.endswith("whole") or label == "whole command":
                whole = s
                out.append("| **%s: %s** | **%.3f** | %s | %s | |" % (
                    section, label, s or 0.0, "%.3f" % ceil if ceil else "",
                    "%.0f %%" % (100 * ceil / s) if ceil and s else ""))
                continue
            out.append("| %s | %.4f | %s | %s | %s |" % (
                label, s or 0.0, "%.4f" % ceil if ceil else "", "%.0f %%" % (100 * ceil / s) if ceil and s else "",
                "%.1f %%" % (100 * s / whole) if whole and s is not None else ""))
        note = solver_note(r)
        if note:
            out += ["", note]
    out.append("")
    out.append("For context, the report trained ~%d k iterations in ~%d h on one 2016 GPU: ≈ %.2f s per "
               "iteration." % (paper.REPORT_ITERATIONS // 1000, paper.REPORT_HOURS, REPORT_ITER_S))
    return "\n".join(out) + "\n"


def write(r, out):
    """results.json (out) and results.md beside it; returns the markdown path."""
    atomic.write_json(out, r)
    md = os.path.splitext(out)[0] + ".md"
    atomic.write_text(md, markdown(r, r.get("command", "python3 -m tools.bench")))
    return md
