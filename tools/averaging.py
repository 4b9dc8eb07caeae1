"""Weight averaging for training: an exponential moving average (EMA) of the net's weights.

Batch-1 training moves the weights noisily from image to image, and the validation Dice of the raw weights
swings from one checkpoint to the next. The average of the recent weights is a steadier model (Polyak
averaging). `WeightAverage` keeps that average beside the solver's net: `update()` after every solver step,
`swapped_in()` puts it into the net for a validation or a save and puts the raw weights back afterwards (the
solver goes on from the raw weights). Early on the average uses a shorter horizon, decay_t =
min(decay, (1 + t) / (10 + t)), so that it follows the fast first changes. The deploy net is the same; only
which weights it gets changes.
"""
import concurrent.futures
import contextlib
import os

import numpy as np

PARALLEL_MIN = 1 << 20          # blobs below this many weights are averaged in one piece


def _ema_step(job):
    avg, new, part, d = job
    np.multiply(new, 1.0 - d, out=part)       # into scratch: no 200 MB temporary per fc6 update
    avg *= d
    avg += part


class WeightAverage:
    """EMA of every parameter blob of a pycaffe net (frozen ones stay what they are)."""

    def __init__(self, net, decay, updates=0):
        if not 0 < decay < 1:
            raise ValueError("averaging decay must be in (0, 1), not %r" % decay)
        self.net, self.decay, self.updates = net, float(decay), int(updates)
        self.blobs = [blob for blobs in net.params.values() for blob in blobs]
        self.average = [np.array(b.data, dtype=np.float32) for b in self.blobs]
        self._scratch = np.empty(max([b.data.size for b in self.blobs] or [0]), dtype=np.float32)
        self._threads = max(1, min(len(os.sched_getaffinity(0)), 8))
        self._pool = concurrent.futures.ThreadPoolExecutor(self._threads)

    def update(self):
        self.updates += 1
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        # Element-wise, so a large blob is cut into one piece per thread (numpy releases the GIL): the same
        # numbers as one pass, in about half the time on two cores. Pieces of one blob use disjoint scratch.
        for avg, blob in zip(self.average, self.blobs):
            avg, new, scratch = avg.reshape(-1), blob.data.reshape(-1), self._scratch[:avg.size]
            if avg.size < PARALLEL_MIN or self._threads == 1:
                _ema_step((avg, new, scratch, d))
                continue
            step = -(-avg.size // self._threads)
            pieces = [(avg[i:i + step], new[i:i + step], scratch[i:i + step], d) for i in range(0, avg.size, step)]
            list(self._pool.map(_ema_step, pieces))

    @contextlib.contextmanager
    def swapped_in(self):
        raw = [b.data.copy() for b in self.blobs]
        try:
            for avg, blob in zip(self.average, self.blobs):
                blob.data[...] = avg
            yield self.net
        finally:
            for saved, blob in zip(raw, self.blobs):
                blob.data[...] = saved

    def save(self, path):
        """The averaged weights as a caffemodel (the net's own raw weights are untouched)."""
        with self.swapped_in():
            self.net.save(path)

    def load(self, path):
        """Take the average from a caffemodel written by save()."""
        raw = [b.data.copy() for b in self.blobs]
        try:
            self.net.copy_from(path)
            self.average = [np.array(b.data, dtype=np.float32) for b in self.blobs]
        finally:
            for saved, blob in zip(raw, self.blobs):
                blob.data[...] = saved
