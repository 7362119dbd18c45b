"""Train/validation/test splits over encoded ratings.

Each function takes arrays sorted canonically by (user, item) and returns a label per rating:
``TRAIN``, ``VAL`` or ``TEST`` (int8), plus a dict describing the split for the manifest. Results depend
only on the data and the seed, never on the input file's row order.
"""

from __future__ import annotations

import numpy as np

TRAIN, VAL, TEST = 0, 1, 2


def _counts(frac: float, n: int) -> int:
    return int(round(frac * n))


def random_split(n: int, val_frac: float, test_frac: float, seed: int) -> tuple[np.ndarray, dict]:
    """Uniformly random rows to val/test in the given proportions."""
    rng = np.random.default_rng([seed, 0xA11])
    perm = rng.permutation(n)
    n_test, n_val = _counts(test_frac, n), _counts(val_frac, n)
    labels = np.zeros(n, dtype=np.int8)
    labels[perm[:n_test]] = TEST
    labels[perm[n_test : n_test + n_val]] = VAL
    return labels, {"kind": "random", "val_frac": val_frac, "test_frac": test_frac, "seed": seed}


def temporal_split(user: np.ndarray, timestamp: np.ndarray, val_k: int, test_k: int) -> tuple[np.ndarray, dict]:
    """Each user's last ``test_k`` ratings go to test and the ``val_k`` before them to val.

    A user always keeps at least one training rating, so users with few ratings hold out fewer.
    Ties in time are broken by item index (the canonical order), so the split is deterministic.
    """
    n = len(user)
    order = np.lexsort((np.arange(n), timestamp, user))  # by user, then time, then canonical position
    u_sorted = user[order]
    starts = np.flatnonzero(np.r_[True, u_sorted[1:] != u_sorted[:-1]])
    sizes = np.diff(np.r_[starts, n])
    pos = np.arange(n) - np.repeat(starts, sizes)
    from_end = np.repeat(sizes, sizes) - 1 - pos
    size = np.repeat(sizes, sizes)
    k_test = np.minimum(test_k, size - 1)
    k_val = np.minimum(val_k, size - 1 - k_test)
    lab_sorted = np.where(from_end < k_test, TEST, np.where(from_end < k_test + k_val, VAL, TRAIN))
    labels = np.empty(n, dtype=np.int8)
    labels[order] = lab_sorted
    return labels, {"kind": "temporal", "val_k": val_k, "test_k": test_k}


def time_split(timestamp: np.ndarray, val_frac: float, test_frac: float) -> tuple[np.ndarray, dict]:
    """A global time cutoff: the latest ``test_frac`` of ratings are test, the ``val_frac`` before are val."""
    n = len(timestamp)
    order = np.argsort(timestamp, kind="stable")
    n_test, n_val = _counts(test_frac, n), _counts(val_frac, n)
    labels = np.zeros(n, dtype=np.int8)
    labels[order[n - n_test :]] = TEST
    labels[order[n - n_test - n_val : n - n_test]] = VAL
    spec = {"kind": "time", "val_frac": val_frac, "test_frac": test_frac}
    if n_test:
        spec["test_from_timestamp"] = int(timestamp[order[n - n_test]])
    if n_val:
        spec["val_from_timestamp"] = int(timestamp[order[n - n_test - n_val]])
    return labels, spec


def predefined_split(is_test: np.ndarray, val_frac: float, seed: int) -> tuple[np.ndarray, dict]:
    """Test rows come from a separate file; val is a random ``val_frac`` of the remaining rows."""
    labels = np.where(is_test, TEST, TRAIN).astype(np.int8)
    rest = np.flatnonzero(~is_test)
    rng = np.random.default_rng([seed, 0xA11])
    n_val = _counts(val_frac, len(rest))
    labels[rng.permutation(rest)[:n_val]] = VAL
    return labels, {"kind": "predefined", "val_frac": val_frac, "seed": seed}
