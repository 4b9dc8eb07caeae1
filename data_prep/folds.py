"""Cross-validation folds by patient, never by slice (SPEC §5, §7).

k folds (paper.N_FOLDS = 5 by default) of sizes floor(N/k), the last one taking the rest
(107 patients -> 21, 21, 21, 21, 23); patients are shuffled with a seeded numpy RandomState
(paper.SEED), so the same ids and seed always give the same folds. Ids inside a fold are sorted.
"""
from typing import List, Sequence

import numpy as np

import paper


def fold_sizes(n: int, k: int = paper.N_FOLDS) -> List[int]:
    """[floor(n/k)] * (k - 1) + [the rest]."""
    if k < 1:
        raise ValueError("need at least 1 fold, got %d" % k)
    if n < k:
        raise ValueError("%d patients cannot fill %d folds (need at least one per fold)" % (n, k))
    base = n // k
    return [base] * (k - 1) + [n - base * (k - 1)]


def assign_folds(ids: Sequence[str], k: int = paper.N_FOLDS, seed: int = paper.SEED) -> List[List[str]]:
    """Split patient ids into k folds (lists of ids), seeded shuffle, remainder to the last fold."""
    ids = sorted(ids)
    if len(set(ids)) != len(ids):
        raise ValueError("patient ids are not unique")
    sizes = fold_sizes(len(ids), k)
    order = np.random.RandomState(seed).permutation(len(ids))
    folds, start = [], 0
    for size in sizes:
        folds.append(sorted(ids[i] for i in order[start:start + size]))
        start += size
    return folds
