"""8x augmentation (SPEC §5): the 4 rotations x mirror of the dihedral group, image and label alike.

Transform k (0..7) = rotate by (k % 4) x 90 degrees (np.rot90 on the last two axes, counter-clockwise
as displayed with row 0 on top), then, for k >= 4, mirror left-right. k = 0 is the identity.
invert(k, a) undoes transform(k, a) exactly (the mirror first, then the opposite rotation).
augment8 keeps each image's 8 versions together (image-major: i*8 + k), so a per-image array such as
the source slice index repeats with np.repeat(x, 8).
"""
import numpy as np

import paper

K = paper.AUGMENTATIONS


def transform(k: int, array) -> np.ndarray:
    """The k-th of the 8 transforms on the last two axes (H, W)."""
    if not 0 <= int(k) < K:
        raise ValueError("augmentation index %r not in 0..%d" % (k, K - 1))
    a = np.rot90(np.asarray(array), int(k) % 4, axes=(-2, -1))
    return np.flip(a, axis=-1) if k >= 4 else a


def invert(k: int, array) -> np.ndarray:
    """Undo transform(k, .) on the last two axes: invert(k, transform(k, a)) == a."""
    if not 0 <= int(k) < K:
        raise ValueError("augmentation index %r not in 0..%d" % (k, K - 1))
    a = np.asarray(array)
    if k >= 4:
        a = np.flip(a, axis=-1)
    return np.rot90(a, -(int(k) % 4), axes=(-2, -1))


def augment8(image_chw, label_hw):
    """Images (C, H, W) or (N, C, H, W) and labels (H, W) / (N, H, W) / (N, 1, H, W) ->
    (N*8, C, H, W) images and the labels with the same leading N*8, both contiguous, order i*8 + k."""
    img = np.asarray(image_chw)
    lab = np.asarray(label_hw)
    if img.ndim == 3:
        img, lab = img[None], lab[None]
    if img.ndim != 4 or img.shape[0] != lab.shape[0] or img.shape[-2:] != lab.shape[-2:]:
        raise ValueError("augment8 needs (N,C,H,W) images and (N,[1,]H,W) labels, got %s and %s"
                         % (img.shape, lab.shape))
    if img.shape[-1] != img.shape[-2]:
        raise ValueError("augment8 needs square images (rotations), got %s" % (img.shape,))
    imgs = np.stack([transform(k, img) for k in range(K)], axis=1)   # (N, 8, C, H, W)
    labs = np.stack([transform(k, lab) for k in range(K)], axis=1)
    return (np.ascontiguousarray(imgs.reshape((-1,) + img.shape[1:])),
            np.ascontiguousarray(labs.reshape((-1,) + lab.shape[1:])))
