#!/usr/bin/env python3
"""`make segment`: a new CT and a box around the tumor -> the tumor mask in the scan's own geometry.

Owns the segmentation pipeline of a new scan: the user's box (or a rough ROI) -> the training box rule
-> the same crop and intensity mapping as `make data` (data_prep.crop.crop_slice,
data_prep.intensity.hu_to_net) -> the deploy net (tools/caffe_net.py: the caffemodel read once, all the
slices in batches) -> the tumor probability put back on the original grid (data_prep.crop.uncrop)
-> threshold. The writers of the outputs live in tools/seg_output.py.

Coordinates
-----------
BOX is ``x0,y0,x1,y1`` in pixel coordinates of the slices as displayed (x = column, y = row),
**half-open** like SLICES and Python slices: the box covers columns x0 .. x1-1 and rows y0 .. y1-1
(equivalently, x0..x1 and y0..y1 are pixel *edges*). A box may touch the image edge (x1 = width) but
not leave it. SLICES ``z0:z1`` is a half-open range of slice indices of the sorted series (index 0 =
the first slice along the slice normal); default: all slices. ROI (a mask file, RTSTRUCT or DICOM-SEG)
replaces both: its bounding box over its slices is used; --roi-regex picks its ROI/segment by name
exactly as `make data`'s --roi does. One box serves the whole SLICES range, grown
with the training rule (data_prep.crop.box_for_extent: square, 2x the largest extent, at least 100).
Slices outside SLICES are left empty.

The model's own settings: when the caffemodel lies in a run folder of tools/train.py (RUN/final.caffemodel or
RUN/snapshots/...), its run.json gives the decision rule (tools/score.py: the tumor probability threshold)
and its DATA's manifest the HU window and the resize mode the model was trained with; --threshold,
--hu-window and --resize override them, and without a run folder the report's defaults apply.

Outputs in OUT: mask.nii.gz, prob.nii.gz, seg.dcm (DICOM scans), overlays/slice_NNN.png,
summary.json. No patient-identifying text goes into logs or summary.json: a refusal is one line, with
the readers' redaction (no DICOM names or IDs) and the scan's and ROI's paths written SCAN and ROI_FILE.
"""
import argparse
import os
import re
import sys
import time
from typing import Callable, Optional, Sequence, Tuple

import numpy as np

import atomic
import paper
from data_prep import crop, intensity
from tools import caffe_net, score

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PROTOTXT = os.path.join(REPO, "prototxt", "deploy.prototxt")
# Images per forward. On the CPU, Caffe's convolutions loop over the batch (one im2col + GEMM per
# image), so batching saves nothing and larger blobs fall out of cache: measured 0.60 / 0.65 / 0.75
# CPU-s per slice at batch 1 / 10 / 30 (2 cores). On a GPU, batches keep the device busy.
DEFAULT_BATCH = 1
DEFAULT_GPU_BATCH = 10
PROB_BLOB = "prob"


class SegmentError(Exception):
    """A bad request or input: main() prints it as one line and exits with status 2."""


# --- parsing and checks -----------------------------------------------------------------------------

def parse_box(text: str) -> Tuple[int, int, int, int]:
    """'x0,y0,x1,y1' -> ints (half-open: columns x0..x1-1, rows y0..y1-1)."""
    try:
        x0, y0, x1, y1 = (int(round(float(v))) for v in str(text).split(","))
    except ValueError:
        raise SegmentError("--box must be x0,y0,x1,y1 (four integers), got %r" % (text,))
    if x1 <= x0 or y1 <= y0:
        raise SegmentError("--box %s is empty: need x0 < x1 and y0 < y1 (half-open)" % (text,))
    return x0, y0, x1, y1


def parse_slices(text: Optional[str], n_slices: int) -> Tuple[int, int]:
    """'z0:z1' (half-open; either end may be left out) -> (z0, z1) inside 0..n_slices."""
    if text is None or str(text).strip() in ("", ":"):
        return 0, n_slices
    parts = str(text).split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        z0 = int(parts[0]) if parts[0].strip() else 0
        z1 = int(parts[1]) if parts[1].strip() else n_slices
    except ValueError:
        raise SegmentError("--slices must be z0:z1 (half-open slice range), got %r" % (text,))
    if not 0 <= z0 < z1 <= n_slices:
        raise SegmentError("--slices %s out of range: the scan has slices 0:%d (need 0 <= z0 < z1 <= %d)"
                           % (text, n_slices, n_slices))
    return z0, z1


def check_box(box_xy: Sequence[int], shape_yx: Sequence[int]) -> None:
    """The half-open box must lie inside the slice (touching its edge is fine)."""
    x0, y0, x1, y1 = box_xy
    h, w = int(shape_yx[0]), int(shape_yx[1])
    if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
        raise SegmentError("--box %d,%d,%d,%d is outside the image: slices are %d x %d pixels "
                           "(x in 0..%d, y in 0..%d, half-open)" % (x0, y0, x1, y1, w, h, w, h))


def check_ct(scan) -> None:
    """DICOM scans must be CT. The reader keeps only CT images (by SOP class, file meta, or Modality
    with pixel data: data_prep.dicom_files); a CT-class series whose Modality names another modality
    (PT, MR) is refused here. An empty or missing Modality is no objection (de-identification tools
    blank it). NIfTI/NRRD carry no modality and are taken as CT in HU."""
    headers = getattr(scan, "headers", None) or []
    if headers:
        modality = str(getattr(headers[0], "Modality", "") or "").strip()
        if modality and modality.upper() != "CT":
            raise SegmentError("scan is not CT (Modality %s): the net was trained on CT in Hounsfield "
                               "units" % modality)


def roi_extent(mask_zyx) -> Tuple[Tuple[int, int, int, int], Tuple[int, int]]:
    """Bounding box of a rough ROI: ((x0, y0, x1, y1), (z0, z1)), all half-open."""
    mask = np.asarray(mask_zyx) != 0
    zs = np.flatnonzero(mask.any(axis=(1, 2)))
    if zs.size == 0:
        raise SegmentError("--roi is empty on this scan's grid: no slice has ROI pixels")
    rows = np.flatnonzero(mask.any(axis=(0, 2)))
    cols = np.flatnonzero(mask.any(axis=(0, 1)))
    return ((int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1),
            (int(zs[0]), int(zs[-1]) + 1))


def grown_box(box_xy: Sequence[int]) -> crop.Box:
    """The user's half-open box -> the training box (data_prep.crop.box_for_extent, inclusive ends)."""
    x0, y0, x1, y1 = box_xy
    return crop.box_for_extent(y0, x0, y1 - 1, x1 - 1)


# --- the pipeline (the net is a function: (N, 3, S, S) net input -> (N, S, S) tumor probability) -------

Predict = Callable[[np.ndarray], np.ndarray]


def net_input(hu_zyx, box: crop.Box, z0: int, z1: int, window=paper.HU_WINDOW,
              resize=paper.DEFAULT_RESIZE) -> np.ndarray:
    """Slices z0:z1 cut exactly as `make data` does: float32 (N, 3, size, size)."""
    crops = crop.crop_slice(np.asarray(hu_zyx)[z0:z1], box, fill=paper.AIR_HU, size=paper.INPUT_SIZE,
                            resize=resize)
    return intensity.hu_to_net(crops, window)


def back_map(prob_crops, box: crop.Box, z0: int, shape_zyx) -> np.ndarray:
    """Tumor probability crops (N, size, size) of slices z0:z0+N -> float32 volume of shape_zyx
    (inverse resize and placement; 0 outside the box and outside the slice range)."""
    prob_crops = np.asarray(prob_crops, dtype=np.float32)
    out = np.zeros(tuple(shape_zyx), dtype=np.float32)
    out[z0:z0 + len(prob_crops)] = crop.uncrop(prob_crops, box, shape_zyx[1:])
    return out


def threshold_mask(prob, threshold=0.5) -> np.ndarray:
    """tools/score.py's rule (prob > threshold) as uint8 {0, 1}."""
    return score.predict(prob, threshold).astype(np.uint8)


def model_settings(model):
    """What the model was trained with, from the run folder it lies in (tools/caffe_net.model_run): {"threshold",
    "hu_window", "resize", "from"}; the report's defaults (argmax, paper.HU_WINDOW, bilinear) where there is no
    run.json."""
    out = {"threshold": score.tumor_threshold(), "hu_window": list(paper.HU_WINDOW),
           "resize": paper.DEFAULT_RESIZE, "from": "defaults (no run.json beside the model)"}
    run = caffe_net.model_run(model)
    if run is None:
        return out
    try:
        info = caffe_net.run_info(run)
        out["threshold"] = score.tumor_threshold(info.get("decision", score.DEFAULT_DECISION),
                                                 info.get("class_weights", paper.CLASS_WEIGHTS))
        out["from"] = "run.json (decision %s)" % info.get("decision", score.DEFAULT_DECISION)
        manifest = caffe_net.run_manifest(info)
        if manifest is not None:
            params = manifest["params"]
            out["hu_window"] = list(params.get("hu_window", out["hu_window"]))
            out["resize"] = params.get("resize", out["resize"])
            out["from"] += " and its data's manifest"
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SegmentError("the model's run.json or manifest cannot be read (%s); pass --threshold, "
                           "--hu-window and --resize" % type(e).__name__)
    return out


def segment_volume(hu_zyx, box: crop.Box, z0: int, z1: int, predict: Predict,
                   threshold=0.5, window=paper.HU_WINDOW, resize=paper.DEFAULT_RESIZE):
    """The whole back-mapping pipeline around `predict`. Returns (prob, mask, seconds) where prob is
    float32 and mask uint8 on the scan's (Z, Y, X) grid and seconds times the stages."""
    t0 = time.perf_counter()
    x = net_input(hu_zyx, box, z0, z1, window, resize)
    t1 = time.perf_counter()
    p = np.asarray(predict(x), dtype=np.float32)
    if p.shape != (z1 - z0, x.shape[-2], x.shape[-1]):
        raise ValueError("predict returned %s, expected %s" % (p.shape, (z1 - z0,) + x.shape[-2:]))
    t2 = time.perf_counter()
    prob = back_map(p, box, z0, np.shape(hu_zyx))
    mask = threshold_mask(prob, threshold)
    t3 = time.perf_counter()
    return prob, mask, {"crop": t1 - t0, "net": t2 - t1, "back_map": t3 - t2}


class CaffePredictor:
    """The deploy net as a `Predict`: tools/caffe_net opens it (the caffemodel read once) and forwards all
    slices in batches of at most `batch`; the tumor channel of the `prob` blob."""

    def __init__(self, prototxt, model, batch=DEFAULT_BATCH, gpu=None):
        self.batch = max(1, int(batch))
        try:
            self.net = caffe_net.open_net(prototxt, model, gpu)
        except caffe_net.NetError as e:
            raise SegmentError(str(e))
        if "data" not in self.net.blobs or PROB_BLOB not in self.net.blobs:
            raise SegmentError("the net has no 'data' input or no '%s' output: not a TS-FCN deploy net"
                               % PROB_BLOB)

    def __call__(self, x):
        return caffe_net.forward(self.net, x, (PROB_BLOB,), self.batch, channel=paper.TUMOR,
                                 progress="segment")[PROB_BLOB]


# --- the command ------------------------------------------------------------------------------------

def request_region(args, scan):
    """(box_xy half-open, (z0, z1)) from --box/--slices or --roi, checked against the scan."""
    n_slices, h, w = scan.hu.shape
    if args.roi:
        from data_prep import readers
        if not os.path.exists(args.roi):
            raise SegmentError("--roi not found (give a mask file, an RTSTRUCT/DICOM-SEG or its folder)")
        box_xy, (z0, z1) = roi_extent(readers.load_roi_mask(args.roi, scan, roi_regex=args.roi_regex))
    else:
        box_xy = parse_box(args.box)
        z0, z1 = parse_slices(args.slices, n_slices)
    check_box(box_xy, (h, w))
    return box_xy, (z0, z1)


def build_parser():
    p = argparse.ArgumentParser(
        description="Segment the lung tumor of a new CT scan inside a box with a trained TS-FCN: "
                    "writes mask.nii.gz, prob.nii.gz, seg.dcm (DICOM scans), PNG overlays and "
                    "summary.json into OUT.",
        epilog="BOX is half-open in displayed pixel coordinates: x0,y0,x1,y1 covers columns x0..x1-1 "
               "and rows y0..y1-1. SLICES z0:z1 is half-open in the sorted series.")
    p.add_argument("--scan", required=True, help="DICOM series folder, or a .nii/.nii.gz/.nrrd image")
    region = p.add_mutually_exclusive_group(required=True)
    region.add_argument("--box", help="x0,y0,x1,y1 around the tumor (half-open, x = column, y = row)")
    region.add_argument("--roi", help="rough ROI instead of --box/--slices: a mask file (NIfTI/NRRD) "
                                      "or an RTSTRUCT/DICOM-SEG; its bounding box is used")
    p.add_argument("--roi-regex", default=paper.ROI_REGEX,
                   help="with --roi: regex (case-insensitive) choosing the ROI/segment of an RTSTRUCT/SEG, as "
                        "`make data`'s --roi (a single ROI is used whatever its name; default %(default)r)")
    p.add_argument("--slices", help="z0:z1, half-open range of slices to segment (default: all)")
    p.add_argument("--model", required=True, help="trained .caffemodel")
    p.add_argument("--prototxt", default=DEFAULT_PROTOTXT,
                   help="deploy net (default: prototxt/deploy.prototxt of this checkout)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--threshold", type=float, default=None,
                   help="tumor probability threshold (default: the model run's decision rule, tools/score.py; "
                        "0.5, argmax, without a run.json beside the model)")
    p.add_argument("--resize", choices=paper.RESIZE_MODES, default=None,
                   help="box -> 100x100 resize the model was trained with (default: its data's manifest, else "
                        "%s)" % paper.DEFAULT_RESIZE)
    p.add_argument("--batch", type=int, default=None,
                   help="images per forward (default: %d on the CPU, %d on a GPU)" % (DEFAULT_BATCH, DEFAULT_GPU_BATCH))
    p.add_argument("--hu-window", default=None,
                   help="lo,hi HU window the model was trained with (default: its data's manifest, else %s)"
                        % (paper.HU_WINDOW,))
    p.add_argument("--gpu", type=int, default=None, help="GPU id (default: CPU)")
    p.add_argument("--no-png", action="store_true", help="skip the PNG overlays")
    return p


def run(args, predictor_factory=None):
    """Do the work of one command line; returns the summary dict. Raises SegmentError / BadInput."""
    from data_prep import readers
    from tools import seg_output
    if args.roi and args.slices:
        raise SegmentError("--slices goes with --box; --roi gives the slices itself")
    try:
        re.compile(args.roi_regex)
    except re.error as e:
        raise SegmentError("--roi-regex %r is not a valid regex: %s" % (args.roi_regex, e))
    if not os.path.isfile(args.model):
        raise SegmentError("model file not found: %s" % args.model)
    if os.path.getsize(args.model) == 0 and predictor_factory is None:
        raise SegmentError("model file is empty: %s" % args.model)
    if args.batch is None:
        args.batch = DEFAULT_BATCH if args.gpu is None else DEFAULT_GPU_BATCH
    if args.batch < 1:
        raise SegmentError("--batch must be at least 1, got %d" % args.batch)
    if not os.path.isfile(args.prototxt):
        raise SegmentError("deploy prototxt not found: %s" % args.prototxt)
    settings = model_settings(args.model)
    threshold = settings["threshold"] if args.threshold is None else args.threshold
    if not 0.0 < threshold < 1.0:
        raise SegmentError("--threshold must be between 0 and 1, got %s" % threshold)
    resize = args.resize or settings["resize"]
    try:
        window = intensity.parse_window(args.hu_window) if args.hu_window else tuple(settings["hu_window"])
    except ValueError as e:
        raise SegmentError("--hu-window: %s" % e)
    if not os.path.exists(args.scan):
        raise SegmentError("scan not found (give a DICOM folder or a .nii/.nii.gz/.nrrd file)")

    t_start, cpu_start = time.perf_counter(), time.process_time()
    scan = readers.load_scan(args.scan)
    check_ct(scan)
    box_xy, (z0, z1) = request_region(args, scan)
    box = grown_box(box_xy)
    t_loaded = time.perf_counter()

    factory = predictor_factory or (lambda: CaffePredictor(args.prototxt, args.model, args.batch, args.gpu))
    predict = factory()
    t_net = time.perf_counter()
    prob, mask, seconds = segment_volume(scan.hu, box, z0, z1, predict, threshold, window, resize)
    t_seg = time.perf_counter()

    written = seg_output.write_all(args.out, scan, prob, mask, (z0, z1), box,
                                   scan_path=args.scan, png=not args.no_png)
    t_done = time.perf_counter()

    n = z1 - z0
    voxel_ml = float(np.prod(scan.spacing)) / 1000.0
    tumor_slices = [int(z) for z in np.flatnonzero(mask.any(axis=(1, 2)))]
    seg_seconds = t_seg - t_net
    summary = {
        "scan": {"shape_zyx": [int(v) for v in scan.hu.shape],
                 "spacing_zyx_mm": [float(v) for v in scan.spacing], "source_kind": scan.source_kind},
        "box_xy": [int(v) for v in box_xy],
        "box_convention": "half-open x0,y0,x1,y1 (columns x0..x1-1, rows y0..y1-1)",
        "net_box": box.to_json(),
        "slices": [int(z0), int(z1)],
        "segmented_slices": int(n),
        "tumor_slices": tumor_slices,
        "tumor_voxels": int(mask.sum()),
        "volume_ml": float(mask.sum()) * voxel_ml,
        "threshold": float(threshold),
        "hu_window": [float(v) for v in window],
        "resize": resize,
        "settings_from": settings["from"] if None in (args.threshold, args.hu_window, args.resize) else "command line",
        "model": os.path.basename(args.model),
        "prototxt": os.path.basename(args.prototxt),
        "batch": int(args.batch),
        "device": "cpu" if args.gpu is None else "gpu%d" % args.gpu,
        "seconds_per_slice": seg_seconds / max(n, 1),
        "seconds": {"load_scan": t_loaded - t_start, "load_net": t_net - t_loaded,
                    "segment": seg_seconds, **seconds, "write": t_done - t_seg,
                    "total": t_done - t_start},
        "cpu_seconds": time.process_time() - cpu_start,   # all threads: the work, whatever the load
        "outputs": sorted(written),
    }
    atomic.write_json(os.path.join(args.out, "summary.json"), summary)
    return summary


def _glue_values(argv):
    """'--box -2,0,9,9' -> '--box=-2,0,9,9': argparse would take a leading '-' for an option."""
    out, it = [], iter(argv)
    for a in it:
        if a in ("--box", "--slices"):
            out.append(a + "=" + next(it, ""))
        else:
            out.append(a)
    return out


def error_line(error, args) -> str:
    """The one error line: the scan's and the ROI's paths (which may name the patient) replaced by
    SCAN and ROI_FILE; the readers have already removed DICOM names and IDs."""
    from data_prep import errors
    text = str(error)
    for path, name in ((getattr(args, "scan", None), "SCAN"), (getattr(args, "roi", None), "ROI_FILE")):
        if path:
            text = errors.redact(text, {path, os.path.abspath(path), os.path.realpath(path)},
                                 ignore_case=False, by=name)
    return "segment: error: " + " ".join(text.split())


def main(argv=None):
    args = build_parser().parse_args(_glue_values(sys.argv[1:] if argv is None else list(argv)))
    from data_prep import errors
    try:
        s = run(args)
    except (SegmentError, errors.BadInput) as e:
        print(error_line(e, args), file=sys.stderr)
        return 2
    print("segment: %d slices %d:%d, %.2f s/slice (%.1f s total), tumor on %d slices, %.2f mL -> %s"
          % (s["segmented_slices"], s["slices"][0], s["slices"][1], s["seconds_per_slice"],
             s["seconds"]["total"], len(s["tumor_slices"]), s["volume_ml"], ", ".join(s["outputs"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
