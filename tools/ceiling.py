"""The resolution ceiling (SPEC §6): the 3D Dice that the net's 15x15 output could reach on a patient.

The net decides tumor where the upsampled two-class score difference is positive, and that difference
comes from a 15x15 map through the frozen bilinear deconvolution (kernel 16, stride 8) and the crop, one
linear map per axis: upsampled = M D Mᵀ with M the 100 x 15 matrix `upsample_matrix` builds (Caffe's
bilinear filler, the run's crop offset from prototxt/net.py). For each slice's truth Y (+1 tumor, -1
background) the best map in the least-squares sense is D = M⁺ Y M⁺ᵀ; thresholding M D Mᵀ at 0 gives the
slice's ceiling mask, and the patient's ceiling is the 3D Dice of those masks (tools/score.py). No weights
of this net can do much better: a shortfall below it is training, not architecture.

CLI: python3 -m tools.ceiling --data DATA --fold K [--crop center|aligned]: the fold's ceilings as a table.
"""
import argparse
import functools

import numpy as np

import paper
from tools import score


def bilinear_kernel(kernel=paper.UPSCORE_KERNEL):
    """Caffe's BilinearFiller weights along one axis (the 2D filter is their outer product)."""
    f = int(np.ceil(kernel / 2.0))
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    x = np.arange(kernel, dtype=np.float64)
    return 1 - np.abs(x / f - c)


@functools.lru_cache(maxsize=None)
def upsample_matrix(offset, n_in=paper.BLOB_SIDES["score"], size=paper.INPUT_SIZE,
                    kernel=paper.UPSCORE_KERNEL, stride=paper.UPSCORE_STRIDE):
    """M (size x n_in): along one axis, deconvolution (stride, bilinear kernel) then crop at `offset`."""
    w = bilinear_kernel(kernel)
    m = np.zeros((size, n_in))
    for j in range(size):
        for i in range(n_in):
            k = j + offset - stride * i
            if 0 <= k < kernel:
                m[j, i] = w[k]
    m.setflags(write=False)
    return m


def best_masks(truth, offset):
    """The least-squares ceiling masks (N, H, W) bool of truth masks (N, H, W) (or one (H, W))."""
    y = np.where(np.asarray(truth) != 0, 1.0, -1.0)
    m = upsample_matrix(int(offset))
    pinv = np.linalg.pinv(m)
    fitted = m @ (pinv @ y @ pinv.T) @ m.T          # broadcasts over the leading slice axis
    return fitted > 0


def patient_ceiling(truth, offset):
    """The ceiling 3D Dice of one patient's (N, H, W) truth masks."""
    return score.dice_3d(best_masks(truth, offset), truth)


def fold_ceilings(patients, offset):
    """{pseudonym: ceiling 3D Dice} of tools/validation.load_patients' validation patients."""
    return {pid: patient_ceiling(label, offset) for pid, _, label, _ in patients}


def main(argv=None):
    from prototxt import net as netdef
    from tools import validation
    ap = argparse.ArgumentParser(description="Each validation patient's resolution ceiling: the 3D Dice of the "
                                 "best 15x15 score map through the frozen bilinear upsampling and the crop.")
    ap.add_argument("--data", required=True, help="DATA folder (make data)")
    ap.add_argument("--fold", type=int, required=True, help="validation fold k")
    ap.add_argument("--crop", choices=paper.CROP_MODES, default=paper.DEFAULT_CROP_MODE,
                    help="crop mode of the net (default %s)" % paper.DEFAULT_CROP_MODE)
    a = ap.parse_args(argv)
    ceilings = fold_ceilings(validation.load_patients(a.data, a.fold), netdef.crop_offset(a.crop))
    for pid in sorted(ceilings):
        print("%-8s %.3f" % (pid, ceilings[pid]))
    print("mean ceiling 3D Dice %.3f over %d patients (crop %s)" % (score.mean_sd(ceilings.values())[0],
                                                                     len(ceilings), a.crop))


if __name__ == "__main__":
    main()
