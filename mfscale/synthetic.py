"""Deterministic, MovieLens-shaped synthetic ratings at any scale (ml-100k ... ml-32m and beyond).

Used offline instead of real MovieLens. The generative model is known exactly, so the data come with
the best RMSE any model can reach ("best_rmse"), which is what training quality is judged against, and
with planted item groups (genres) that a clustering of learned item factors should recover.

Generative model (one ``numpy.random.Generator(PCG64(seed))`` drives everything):

* Latent factors, rank ``k``. Genre centers ``c_g ~ N(0, (1 - genre_spread) f^2 I)``; every item has one
  primary genre ``g(i)`` and ``q_i = c_g(i) + N(0, genre_spread f^2 I)``; users ``p_u ~ N(0, f^2 I)``.
  ``f = factor_std`` defaults to ``(0.6^2 / k) ** 0.25`` so ``<p_u, q_i>`` has std ~0.6. With the default
  ``genre_spread = 0.3`` and rank 16, genre centers are ~8 within-genre standard deviations apart, so
  KMeans on item factors recovers the genres. A fraction of items get a second genre
  label: the genre whose center is nearest to the item's factor (after the primary).
* Ratings: ``mu = global_mean + b_u + b_i + <p_u, q_i>`` and ``rating = clip(round_half(mu + N(0, noise^2)),
  0.5, 5.0)``. Item biases correlate mildly with popularity (``popularity_bias_corr``), as in real data.
* Who rates what: user activity is ``min_user_ratings`` plus a lognormal share of the rest (capped at
  ``max_user_frac`` of the catalog); item popularity is Zipf-Mandelbrot in rank, ``(x + x0)^-a`` with
  ``a = popularity_exponent`` and ``x0`` solved so the top item is expected to be rated by
  ``top_item_user_frac`` of users (55%, like ml-100k ... ml-32m). Users pick a genre from a
  popularity-weighted softmax that leans towards genres they like (``genre_selection``; ratings are
  missing not at random, as in MovieLens) and then an item of that genre by popularity. Every item is
  first "seeded" into one random user's list, so every user and item appears; duplicate pairs are redrawn
  for a few rounds, and the few users still short get an exact weighted draw without replacement.
* Time: every user is active over one window (lognormal length, median ``session_days``, longer for heavy
  users) inside [start_year, end_year]; a movie's year is never after its first rating (choices ignore
  time, so most synthetic movies are from before ~2000).

``min_user_ratings`` is lowered automatically to ``max(1, min(min_user_ratings, n_items,
n_ratings // (2 * n_users)))`` so at least half the ratings are left for the long tail.

Costs (2 cores): ml-32m takes ~24 s and ~2.0 GiB peak RSS (about 65 bytes per rating).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from .errors import ConfigError
from .shards import find_sorted

GENERATOR_VERSION = 1
RATING_VALUES = np.arange(1, 11, dtype=np.float64) / 2  # 0.5, 1.0, ..., 5.0
_EDGES = RATING_VALUES[:-1] + 0.25  # inner bin edges 0.75 ... 4.75; first and last bins are open-ended
_CHUNK = 1 << 20  # rows per vectorized chunk: bounds temporaries to tens of MiB
_MAX_ROUNDS = 6  # collision redraw rounds before the exact fallback
# MovieLens genre names, roughly in order of frequency, so genre 0 (the largest) is Drama.
GENRE_NAMES = (
    "Drama", "Comedy", "Thriller", "Action", "Romance", "Adventure", "Crime", "Sci-Fi", "Horror", "Fantasy",
    "Children", "Animation", "Mystery", "Documentary", "War", "Musical", "Western", "IMAX", "Film-Noir",
)


@dataclass(frozen=True)
class SyntheticSpec:
    """Sizes and knobs of the generative model (see the module docstring)."""

    n_users: int
    n_items: int
    n_ratings: int
    rank: int = 16  # latent dimension of the true model
    n_genres: int = 12  # planted item groups
    noise: float = 0.75  # std of the Gaussian noise added before rounding
    global_mean: float = 3.55
    user_bias_std: float = 0.35
    item_bias_std: float = 0.40
    factor_std: float | None = None  # None: (0.36 / rank) ** 0.25, so <p_u, q_i> has std ~0.6
    min_user_ratings: int = 20  # lowered automatically for sparse specs (module docstring)
    user_activity_sigma: float = 1.3  # lognormal sigma of per-user counts above the minimum
    max_user_frac: float = 0.75  # no user rates more than this share of the catalog (unless needed)
    popularity_exponent: float = 1.8  # Zipf-Mandelbrot exponent of item popularity by rank
    top_item_user_frac: float = 0.55  # expected share of users who rate the most popular item
    popularity_bias_corr: float = 0.3  # correlation of item bias with log popularity
    genre_spread: float = 0.3  # share of item-factor variance within a genre (lower: tighter clusters)
    genre_size_skew: float = 0.5  # genre g gets a share of items proportional to (g + 1) ** -skew
    second_genre_frac: float = 0.3  # share of items with a second genre label
    genre_selection: float = 0.5  # how strongly users pick genres they like (0: popularity only)
    start_year: int = 1996
    end_year: int = 2023
    session_days: float = 7.0  # median length of a user's active window
    session_sigma: float = 2.0  # lognormal sigma of that length


PRESETS: dict[str, SyntheticSpec] = {
    "ml-32m": SyntheticSpec(200_948, 87_585, 32_000_204),
    "ml-25m": SyntheticSpec(162_541, 59_047, 25_000_095),
    "ml-20m": SyntheticSpec(138_493, 26_744, 20_000_263),
    "ml-10m": SyntheticSpec(69_878, 10_677, 10_000_054),
    "ml-1m": SyntheticSpec(6_040, 3_706, 1_000_209),
    "ml-100k": SyntheticSpec(943, 1_682, 100_000),
    "small": SyntheticSpec(2_000, 1_000, 100_000),
    "tiny": SyntheticSpec(300, 200, 12_000),
}


@dataclass
class SyntheticData:
    """Ratings and movies in the schema of ``mfscale.formats`` plus the generator's parameters.

    ``ratings`` is sorted by (user_id, movie_id) like MovieLens' ratings.csv. ``truth`` is only set by
    ``generate(..., return_truth=True)``: "mu" (float32, one per ratings row), "user_factors" /
    "user_bias" (row u is user_id u + 1), "item_factors" / "item_bias" / "item_genre" (aligned with the
    rows of ``movies``), "genre_centers", "genre_names".
    """

    ratings: pl.DataFrame
    movies: pl.DataFrame
    params: dict
    truth: dict | None = None


def _spec_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(SyntheticSpec)]


def _check_spec(spec: SyntheticSpec) -> None:
    """ConfigError for impossible sizes or out-of-range knobs."""
    for name in ("n_users", "n_items", "n_ratings", "rank", "n_genres", "min_user_ratings",
                 "start_year", "end_year"):
        v = getattr(spec, name)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ConfigError(f"synthetic {name} must be an integer, got {v!r}")
    for name in ("n_users", "n_items", "n_ratings", "rank", "n_genres"):
        if getattr(spec, name) <= 0:
            raise ConfigError(f"synthetic {name} must be positive, got {getattr(spec, name)}")
    u, i, n = spec.n_users, spec.n_items, spec.n_ratings
    if n > u * i:
        raise ConfigError(f"synthetic: {n:,} ratings do not fit in {u:,} users x {i:,} items "
                          f"(at most {u * i:,} distinct pairs)")
    if n < max(u, i):
        raise ConfigError(f"synthetic: {n:,} ratings cannot cover {u:,} users and {i:,} items "
                          f"(need at least {max(u, i):,})")
    floats = {
        "noise": (1e-6, math.inf), "user_bias_std": (0, math.inf), "item_bias_std": (0, math.inf),
        "user_activity_sigma": (0, 10), "max_user_frac": (1e-9, 1), "popularity_exponent": (0, 10),
        "top_item_user_frac": (1e-9, 1), "popularity_bias_corr": (-1, 1), "genre_spread": (0, 1),
        "genre_size_skew": (0, 10), "second_genre_frac": (0, 1), "genre_selection": (0, 10),
        "session_days": (1e-6, 1e5), "session_sigma": (0, 10), "global_mean": (-math.inf, math.inf),
    }
    if spec.factor_std is not None:
        floats["factor_std"] = (0, math.inf)
    for name, (lo, hi) in floats.items():
        v = getattr(spec, name)
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
            raise ConfigError(f"synthetic {name} must be a finite number, got {v!r}")
        if not lo <= v <= hi:
            raise ConfigError(f"synthetic {name} must be in [{lo}, {hi}], got {v}")
    if spec.min_user_ratings < 1:
        raise ConfigError(f"synthetic min_user_ratings must be at least 1, got {spec.min_user_ratings}")
    if not 1970 <= spec.start_year <= spec.end_year <= 2037:
        raise ConfigError(f"synthetic years must satisfy 1970 <= start_year <= end_year <= 2037, "
                          f"got {spec.start_year}..{spec.end_year}")


def resolve_spec(preset: str | None, n_users: int | None = None, n_items: int | None = None,
                 n_ratings: int | None = None, **overrides: Any) -> SyntheticSpec:
    """A spec from a preset name and/or explicit counts; other keyword arguments override model knobs.

    Without a preset all three counts are required. Raises ConfigError on an unknown preset or knob and
    on impossible counts (non-positive, more ratings than user x item pairs, fewer than max(users, items)).
    """
    if preset is not None:
        key = str(preset).strip().lower()
        if key not in PRESETS:
            raise ConfigError(f"unknown synthetic preset {preset!r} (choose from {', '.join(PRESETS)})")
        base = PRESETS[key]
    else:
        missing = [flag for flag, v in (("users", n_users), ("items", n_items), ("ratings", n_ratings)) if v is None]
        if missing:
            raise ConfigError(f"synthetic data without a preset needs explicit counts; missing: {', '.join(missing)}")
        base = SyntheticSpec(n_users, n_items, n_ratings)  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - set(_spec_fields()) - {"n_users", "n_items", "n_ratings"})
    if unknown:
        raise ConfigError(f"unknown synthetic option(s): {', '.join(unknown)}")
    counts = {k: v for k, v in (("n_users", n_users), ("n_items", n_items), ("n_ratings", n_ratings)) if v is not None}
    spec = dataclasses.replace(base, **{**overrides, **counts})
    _check_spec(spec)
    return spec


# ---------------------------------------------------------------------------------------------- helpers


def rating_moments(mu: np.ndarray, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean and variance of ``clip(round_half(mu + N(0, noise^2)), 0.5, 5)`` for each ``mu``.

    The mean is the Bayes-optimal prediction given ``mu``; the variance its expected squared error.
    Uses P(rating >= v_{j+1}) = Phi((mu - e_j) / noise) over the 9 inner bin edges e_j (torch's
    vectorized erfc is ~10x faster than scipy's ndtr here, with the same double precision).
    """
    import torch

    mu = np.asarray(mu, dtype=np.float64).reshape(-1)
    mean = np.empty_like(mu)
    var = np.empty_like(mu)
    edges = torch.from_numpy(_EDGES)
    steps_sq = torch.from_numpy(RATING_VALUES[1:] ** 2 - RATING_VALUES[:-1] ** 2)
    scale = 1.0 / (noise * math.sqrt(2.0))
    for s in range(0, len(mu), _CHUNK):
        m = torch.from_numpy(mu[s:s + _CHUNK])
        tail = 0.5 * torch.erfc((edges[None, :] - m[:, None]) * scale)  # P(rating > e_j)
        e1 = 0.5 + 0.5 * tail.sum(1)
        e2 = 0.25 + tail @ steps_sq
        mean[s:s + _CHUNK] = e1.numpy()
        var[s:s + _CHUNK] = np.maximum((e2 - e1 * e1).numpy(), 0.0)
    return mean, var


def _round_half_clip(x: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(x * 2 + 0.5) / 2, 0.5, 5.0)


def _user_counts(rng: np.random.Generator, spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Ratings per user: exact sum n_ratings, each in [m, cap]; also the activity z-scores, m and cap."""
    u, i, n = spec.n_users, spec.n_items, spec.n_ratings
    m = max(1, min(spec.min_user_ratings, i, n // (2 * u)))
    cap = max(m, int(spec.max_user_frac * i))
    if cap * u < n:  # the soft cap would make the total impossible: allow the whole catalog
        cap = i
    z = rng.standard_normal(u)
    w = np.exp(spec.user_activity_sigma * z)
    extra_total, room = n - m * u, cap - m
    x = np.zeros(u)
    free = np.ones(u, dtype=bool)
    rest = float(extra_total)
    # Water-filling: lognormal shares of the extra ratings, users over the cap pinned at it.
    while rest > 0 and free.any():
        share = rest * w[free] / w[free].sum()
        over = share > room
        idx = np.flatnonzero(free)
        if not over.any():
            x[idx] = share
            break
        x[idx[over]] = room
        free[idx[over]] = False
        rest = extra_total - room * float((~free).sum())
    counts = np.floor(x).astype(np.int64)
    # Largest-remainder rounding to the exact total, never past the cap.
    diff = extra_total - int(counts.sum())
    frac = x - counts
    while diff != 0:
        if diff > 0:
            cand = np.flatnonzero(counts < room)
            pick = cand[np.argsort(-frac[cand], kind="stable")[:diff]]
            counts[pick] += 1
        else:
            cand = np.flatnonzero(counts > 0)
            pick = cand[np.argsort(frac[cand], kind="stable")[:-diff]]
            counts[pick] -= 1
        frac[pick] = 0.0
        diff = extra_total - int(counts.sum())
    return counts + m, z, m, cap


def _popularity(spec: SyntheticSpec, counts: np.ndarray) -> tuple[np.ndarray, float]:
    """Expected-share weights by popularity rank (rank 0 first), and the solved offset x0.

    x0 is chosen so that ``top_item_user_frac`` of users are expected to rate the top item: user u rates
    it unless all of its ``counts[u]`` draws miss it, so heavy users' repeated hits are not counted.
    """
    n_items, a = spec.n_items, spec.popularity_exponent
    x = (np.arange(n_items) + 0.5) / n_items
    want = spec.top_item_user_frac * spec.n_users
    cnt = counts.astype(np.float64)

    def raters(share: float) -> float:
        return float((-np.expm1(cnt * np.log1p(-min(share, 1 - 1e-12)))).sum())

    lo, hi = 0.0, 1.0  # the top item's share of draws giving `want` raters (raters grows with share)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if raters(mid) < want else (lo, mid)
    target = hi

    def top_share(x0: float) -> float:
        w = (x + x0) ** -a
        return float(w[0] / w.sum())

    lo, hi = 1e-9, 1e6  # top_share decreases in x0; bisect in log space
    if top_share(hi) >= target:
        x0 = hi  # even near-uniform popularity is too concentrated (dense data): stay near-uniform
    elif top_share(lo) <= target:
        x0 = lo
    else:
        for _ in range(80):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if top_share(mid) > target else (lo, mid)
        x0 = math.sqrt(lo * hi)
    w = (x + x0) ** -a
    return w / w.sum(), x0


@dataclass
class _GenreSampler:
    """Draw items by popularity within a genre in O(1) each: Walker/Vose alias tables per genre segment.

    Positions index items sorted by genre (``order`` maps a position to an item).
    """

    order: np.ndarray  # (I,) item at each position
    lo: np.ndarray  # (G,) first position of each genre
    size: np.ndarray  # (G,) items per genre
    prob: np.ndarray  # (I,) alias acceptance probability
    alias: np.ndarray  # (I,) alias position
    log_within: np.ndarray  # (I,) log P(item | its genre), by item

    @classmethod
    def build(cls, weights: np.ndarray, genre: np.ndarray, n_genres: int) -> _GenreSampler:
        order = np.argsort(genre, kind="stable")
        size = np.bincount(genre, minlength=n_genres)
        lo = np.concatenate(([0], np.cumsum(size)[:-1]))
        w = weights[order]
        prob = np.ones(len(w))
        alias = np.arange(len(w), dtype=np.int64)
        mass = np.bincount(genre, weights=weights, minlength=n_genres)
        for g in range(n_genres):
            a, n = int(lo[g]), int(size[g])
            if n == 0:
                continue
            scaled = (w[a:a + n] * (n / mass[g])).tolist()
            small = [j for j in range(n) if scaled[j] < 1.0]
            large = [j for j in range(n) if scaled[j] >= 1.0]
            p, al = prob[a:a + n], alias[a:a + n]
            while small and large:  # Vose's alias method
                s, big = small.pop(), large[-1]
                p[s], al[s] = scaled[s], a + big
                scaled[big] -= 1.0 - scaled[s]
                if scaled[big] < 1.0:
                    small.append(large.pop())
            # Leftovers are 1 up to rounding: accept them outright.
        log_within = np.log(weights) - np.log(mass[genre])
        return cls(order.astype(np.int64), lo, size, prob, alias, log_within)

    def draw(self, rng: np.random.Generator, genre: np.ndarray) -> np.ndarray:
        n = len(genre)
        j = self.lo[genre] + np.minimum((rng.random(n) * self.size[genre]).astype(np.int64), self.size[genre] - 1)
        pos = np.where(rng.random(n) < self.prob[j], j, self.alias[j])
        return self.order[pos]


def _draw_keys(rng: np.random.Generator, users: np.ndarray, n_draws: np.ndarray, pi: np.ndarray,
               sampler: _GenreSampler, n_items: int, out: np.ndarray | None = None) -> np.ndarray:
    """Keys user * n_items + item for n_draws[k] popularity/genre draws of users[k] (with repeats)."""
    total = int(n_draws.sum())
    if out is None:
        out = np.empty(total, dtype=np.int64)
    n_genres = pi.shape[1]
    ends = np.cumsum(n_draws)
    start_user, pos = 0, 0
    while start_user < len(users):  # blocks of users with ~_CHUNK draws, to bound temporaries
        stop = int(np.searchsorted(ends, ends[start_user] - n_draws[start_user] + 4 * _CHUNK, side="right"))
        stop = max(stop, start_user + 1)
        ub, nb = users[start_user:stop], n_draws[start_user:stop]
        per_genre = rng.multinomial(nb, pi[ub])  # (b, G) draws per (user, genre)
        rows = np.repeat(np.arange(per_genre.size, dtype=np.int64), per_genre.ravel())
        genre = rows % n_genres
        item = sampler.draw(rng, genre)
        k = len(rows)
        out[pos:pos + k] = ub[rows // n_genres].astype(np.int64) * n_items + item
        pos += k
        start_user = stop
    return out


def _sorted_member(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    return find_sorted(sorted_keys, keys)[1]


def _unique_sorted(keys: np.ndarray) -> np.ndarray:
    """Sort in place and drop repeats (np.unique's hash path is several times slower here)."""
    keys.sort()
    if len(keys) < 2:
        return keys
    keep = np.empty(len(keys), dtype=bool)
    keep[0] = True
    np.not_equal(keys[1:], keys[:-1], out=keep[1:])
    return keys[keep]


def _sample_pairs(rng: np.random.Generator, counts: np.ndarray, pi: np.ndarray, sampler: _GenreSampler,
                  item_genre: np.ndarray, n_items: int) -> tuple[np.ndarray, dict]:
    """Sorted distinct keys user * n_items + item: counts[u] per user, every item at least once."""
    n_users, total = len(counts), int(counts.sum())
    # Coverage: each item goes into one random rating slot, i.e. one user drawn in proportion to activity.
    slots = rng.choice(total, size=n_items, replace=False)
    seed_user = np.searchsorted(np.cumsum(counts), slots, side="right")
    need = counts - np.bincount(seed_user, minlength=n_users)
    keys = np.empty(total, dtype=np.int64)
    keys[:n_items] = seed_user * n_items + np.arange(n_items)
    users = np.flatnonzero(need > 0)
    _draw_keys(rng, users, need[users], pi, sampler, n_items, out=keys[n_items:])
    keys = _unique_sorted(keys)
    bounds = np.arange(n_users + 1, dtype=np.int64) * n_items
    deficit = counts - np.diff(np.searchsorted(keys, bounds))
    waste = deficit / np.maximum(need, 1)  # share of a user's draws lost to repeats
    extra = np.empty(0, dtype=np.int64)
    rounds = 0
    # Redraw what repeats cost, oversampled by each user's observed waste so few rounds are needed; users
    # who get more new items than they need keep a random subset.
    while deficit.any() and rounds < _MAX_ROUNDS:
        rounds += 1
        users = np.flatnonzero(deficit > 0)
        d = deficit[users]
        n_draw = np.ceil(d * 1.2 / np.maximum(1.0 - waste[users], 1.0 / 64)).astype(np.int64) + 2
        new = _unique_sorted(_draw_keys(rng, users, n_draw, pi, sampler, n_items))
        new = new[~_sorted_member(keys, new) & ~_sorted_member(extra, new)]
        owner = new // n_items
        got = np.bincount(owner, minlength=n_users)
        waste[users] = 1.0 - got[users] / n_draw
        if (got > deficit).any():
            order = np.lexsort((rng.random(len(new)), owner))
            owner_sorted = owner[order]
            rank = np.arange(len(new)) - np.searchsorted(owner_sorted, owner_sorted)
            new = np.sort(new[order[rank < deficit[owner_sorted]]])
        extra = np.sort(np.concatenate((extra, new)))
        deficit -= np.bincount(new // n_items, minlength=n_users)
    # Exact fallback for users still short (heavy users of small catalogs): Gumbel-top-k over the items
    # they have not rated yet, with the same genre/popularity probabilities.
    short = np.flatnonzero(deficit > 0)
    log_pi = np.log(np.maximum(pi, 1e-300))
    batch = max(1, (1 << 22) // n_items)
    filled = []
    for s in range(0, len(short), batch):
        ub = short[s:s + batch]
        scores = log_pi[ub][:, item_genre] + sampler.log_within[None, :]
        scores -= np.log(-np.log(1.0 - rng.random(scores.shape)))  # + Gumbel noise; 1 - U avoids log(0)
        for r, u in enumerate(ub):
            lo, hi = u * n_items, (u + 1) * n_items
            have = np.concatenate((keys[np.searchsorted(keys, lo):np.searchsorted(keys, hi)],
                                   extra[np.searchsorted(extra, lo):np.searchsorted(extra, hi)])) - lo
            scores[r, have] = -np.inf
            d = int(deficit[u])
            top = np.argpartition(-scores[r], d - 1)[:d]
            filled.append(lo + top.astype(np.int64))
    if filled:
        extra = np.concatenate([extra, *filled])
    keys = np.concatenate((keys, extra))
    keys.sort()
    info = {"collision_rounds": rounds, "fallback_users": len(short)}
    return keys, info


_ADJ = (
    "Silent", "Broken", "Golden", "Last", "Dark", "Hidden", "Lost", "Wild", "Final", "Crimson", "Midnight",
    "Electric", "Secret", "Frozen", "Burning", "Forgotten", "Eternal", "Little", "Big", "Blue", "Red", "Lonely",
    "Savage", "Gentle", "Strange", "Hollow", "Bitter", "Sweet", "Iron", "Glass", "Velvet", "Distant", "Restless",
    "Perfect", "Dangerous", "Quiet", "Endless", "Fallen", "Brave", "Haunted",
)
_NOUN = (
    "River", "Night", "City", "Heart", "Road", "Summer", "Garden", "Shadow", "Empire", "Island", "Storm",
    "Kingdom", "Mirror", "Promise", "Journey", "Stranger", "Machine", "Harbor", "Winter", "Dream", "Fire",
    "Mountain", "Station", "Letter", "Game", "Signal", "Horizon", "Secret", "Witness", "Bridge", "Desert",
    "Ocean", "Forest", "Detective", "Dancer", "Soldier", "Planet", "Ghost", "Family", "Wedding", "Escape",
    "Legend", "Circus", "Orchard", "Lighthouse",
)


def _titles(rng: np.random.Generator, years: np.ndarray) -> list[str]:
    """MovieLens-style titles: 'Adjective Noun (1997)', 'Noun, The (2001)' (article moved, with a comma)."""
    n = len(years)
    a = rng.integers(0, len(_ADJ), n)
    b = rng.integers(0, len(_NOUN), n)
    c = rng.integers(0, len(_NOUN), n)
    kind = rng.choice(7, size=n, p=[0.4, 0.15, 0.12, 0.1, 0.1, 0.06, 0.07])
    seq = rng.integers(2, 6, n)
    out = []
    for k, ai, bi, ci, si, y in zip(kind.tolist(), a.tolist(), b.tolist(), c.tolist(), seq.tolist(),
                                    years.tolist(), strict=True):
        adj, noun, noun2 = _ADJ[ai], _NOUN[bi], _NOUN[ci]
        if k == 0:
            t = f"{adj} {noun}"
        elif k == 1:
            t = f"{adj} {noun}, The"
        elif k == 2:
            t = f"{noun} of the {noun2}"
        elif k == 3:
            t = f"{adj} {noun} {si}"
        elif k == 4:
            t = f"{noun}: {adj} {noun2}"
        elif k == 5:
            t = f"{noun}, A"
        else:
            t = f"{noun} and {noun2}"
        out.append(f"{t} ({y})")
    return out


def _unix(year: int) -> int:
    return int(datetime(year, 1, 1, tzinfo=timezone.utc).timestamp())


# --------------------------------------------------------------------------------------------- generate


def generate(spec: SyntheticSpec, seed: int = 0, *, return_truth: bool = False) -> SyntheticData:
    """Generate ratings and movies for ``spec``; identical output for identical (spec, seed)."""
    _check_spec(spec)
    rng = np.random.Generator(np.random.PCG64(seed))
    n_users, n_items, n_ratings, k, n_genres = spec.n_users, spec.n_items, spec.n_ratings, spec.rank, spec.n_genres
    f = spec.factor_std if spec.factor_std is not None else (0.36 / k) ** 0.25

    # Items: genre, popularity (from user activity), latent factors, bias.
    genre_share = (np.arange(n_genres) + 1.0) ** -spec.genre_size_skew
    item_genre = rng.choice(n_genres, size=n_items, p=genre_share / genre_share.sum())
    if n_items >= n_genres:  # every genre non-empty
        item_genre[rng.choice(n_items, size=n_genres, replace=False)] = np.arange(n_genres)
    counts, z_act, m_eff, cap = _user_counts(rng, spec)
    pop_by_rank, x0 = _popularity(spec, counts)
    weights = pop_by_rank[rng.permutation(n_items)]
    centers = rng.standard_normal((n_genres, k)) * (f * math.sqrt(1.0 - spec.genre_spread))
    item_factors = centers[item_genre] + rng.standard_normal((n_items, k)) * (f * math.sqrt(spec.genre_spread))
    # Popular items rate a bit higher; centered on the rating-weighted mean so the mean rating stays put.
    log_w = np.log(weights)
    z_pop = (log_w - np.dot(weights, log_w)) / (log_w.std() or 1.0)
    rho = spec.popularity_bias_corr
    item_bias = spec.item_bias_std * (rho * z_pop + math.sqrt(1.0 - rho * rho) * rng.standard_normal(n_items))
    # Second genre: the nearest other center, so the label agrees with the item's factor.
    second = np.full(n_items, -1, dtype=np.int64)
    if n_genres > 1:
        d2 = (centers ** 2).sum(1)[None, :] - 2.0 * item_factors @ centers.T  # + |q|^2, same for all g
        d2[np.arange(n_items), item_genre] = np.inf
        has_second = rng.random(n_items) < spec.second_genre_frac
        second[has_second] = d2[has_second].argmin(1)

    # Users: factors, bias, genre preferences (activity was drawn above: popularity depends on it).
    user_factors = rng.standard_normal((n_users, k)) * f
    user_bias = rng.standard_normal(n_users) * spec.user_bias_std
    mass = np.bincount(item_genre, weights=weights, minlength=n_genres)
    affinity = user_factors @ centers.T
    affinity /= affinity.std() or 1.0
    with np.errstate(divide="ignore"):
        logits = np.log(mass)[None, :] + spec.genre_selection * affinity
    logits -= logits.max(1, keepdims=True)
    pi = np.exp(logits)
    pi /= pi.sum(1, keepdims=True)

    # Who rates what.
    sampler = _GenreSampler.build(weights, item_genre, n_genres)
    keys, sample_info = _sample_pairs(rng, counts, pi, sampler, item_genre, n_items)
    del pi, sampler

    # Ratings, exact oracle error and timestamps, chunk by chunk.
    t_lo, t_hi = _unix(spec.start_year), _unix(spec.end_year + 1) - 1
    span = t_hi - t_lo
    dur = spec.session_days * 86400.0 * np.exp(
        spec.session_sigma * (0.5 * z_act + math.sqrt(0.75) * rng.standard_normal(n_users)))
    dur = np.clip(dur, 60.0, span).astype(np.int64)
    start = np.minimum(rng.integers(t_lo, t_hi + 1, n_users), t_hi - dur)
    pf32, qf32 = user_factors.astype(np.float32), item_factors.astype(np.float32)
    ub32 = (spec.global_mean + user_bias).astype(np.float32)
    ib32 = item_bias.astype(np.float32)
    user_id = np.empty(n_ratings, dtype=np.int64)
    movie_idx = np.empty(n_ratings, dtype=np.int64)
    rating = np.empty(n_ratings, dtype=np.float32)
    timestamp = np.empty(n_ratings, dtype=np.int64)
    mu_all = np.empty(n_ratings, dtype=np.float32) if return_truth else None
    sums = np.zeros(6)  # sq err of mu, Bayes variance, sq err of Bayes mean, rating, rating^2, dot^2
    for s in range(0, n_ratings, _CHUNK):
        kc = keys[s:s + _CHUNK]
        u = kc // n_items
        it = kc - u * n_items
        dot = np.einsum("ij,ij->i", pf32[u], qf32[it])
        mu = ub32[u] + ib32[it] + dot
        r = _round_half_clip(mu + rng.standard_normal(len(kc), dtype=np.float32) * np.float32(spec.noise))
        mean, var = rating_moments(mu, spec.noise)
        r64 = r.astype(np.float64)
        sums += (((r64 - mu) ** 2).sum(), var.sum(), ((r64 - mean) ** 2).sum(), r64.sum(), (r64 ** 2).sum(),
                 float(np.dot(dot, dot)))
        user_id[s:s + len(kc)] = u + 1
        movie_idx[s:s + len(kc)] = it
        rating[s:s + len(kc)] = r
        timestamp[s:s + len(kc)] = start[u] + (rng.random(len(kc)) * (dur[u] + 1)).astype(np.int64)
        if mu_all is not None:
            mu_all[s:s + len(kc)] = mu
    del keys

    # Movies: sparse ids like MovieLens, years no later than the first rating.
    movie_ids = np.sort(rng.choice(3 * n_items, size=n_items, replace=False)) + 1
    first_ts = np.full(n_items, np.iinfo(np.int64).max)
    np.minimum.at(first_ts, movie_idx, timestamp)
    first_year = first_ts.astype("datetime64[s]").astype("datetime64[Y]").astype(np.int64) + 1970
    years = spec.end_year - np.floor(rng.exponential(16.0, n_items)).astype(np.int64)
    late = years > first_year  # rated before release: make it an older film instead
    years[late] = first_year[late] - np.floor(rng.exponential(5.0, int(late.sum()))).astype(np.int64)
    years = np.maximum(years, 1902)
    names = list(GENRE_NAMES) + [f"Genre{g + 1}" for g in range(len(GENRE_NAMES), n_genres)]
    genre_str = [names[g] if s2 < 0 else f"{names[g]}|{names[s2]}"
                 for g, s2 in zip(item_genre.tolist(), second.tolist(), strict=True)]
    movies = pl.DataFrame({
        "movie_id": pl.Series(movie_ids, dtype=pl.Int64),
        "title": pl.Series(_titles(rng, years), dtype=pl.String),
        "genres": pl.Series(genre_str, dtype=pl.String),
        "year": pl.Series(years, dtype=pl.Int32),
    })
    item_counts = np.bincount(movie_idx, minlength=n_items)
    np.take(movie_ids, movie_idx, out=movie_idx)  # in place: item index -> movie id
    ratings = pl.DataFrame({
        "user_id": pl.Series(user_id, dtype=pl.Int64),
        "movie_id": pl.Series(movie_idx, dtype=pl.Int64),
        "rating": pl.Series(rating, dtype=pl.Float32),
        "timestamp": pl.Series(timestamp, dtype=pl.Int64),
    })

    n = float(n_ratings)
    mean_rating = sums[3] / n
    hist = np.bincount(np.rint(rating * 2).astype(np.int64), minlength=11)[1:]
    sorted_items = np.sort(item_counts)[::-1]
    params: dict[str, Any] = {
        **{k: (v.item() if isinstance(v, np.generic) else v) for k, v in dataclasses.asdict(spec).items()},
        "seed": int(seed),
        "generator_version": GENERATOR_VERSION,
        "factor_std_resolved": f,
        "min_user_ratings_effective": m_eff,
        "max_user_ratings_cap": cap,
        "popularity_x0": x0,
        "genre_names": names[:n_genres],
        "genre_items": np.bincount(item_genre, minlength=n_genres).tolist(),
        "best_rmse": math.sqrt(sums[1] / n),  # Bayes-optimal predictor E[rating | mu], exact
        "oracle_rmse_empirical": math.sqrt(sums[2] / n),  # the same predictor scored on these ratings
        "noise_rmse": math.sqrt(sums[0] / n),  # mu itself as the prediction
        "mean_rating": float(mean_rating),
        "constant_rmse": math.sqrt(max(sums[4] / n - mean_rating ** 2, 0.0)),  # predict the global mean
        "interaction_std": math.sqrt(sums[5] / n),
        "rating_histogram": {f"{v:.1f}": int(c) for v, c in zip(RATING_VALUES, hist, strict=True)},
        "user_ratings": {"min": int(counts.min()), "median": float(np.median(counts)),
                         "mean": float(counts.mean()), "max": int(counts.max())},
        "item_ratings": {"min": int(sorted_items[-1]), "median": float(np.median(sorted_items)),
                         "max": int(sorted_items[0]),
                         "top1pct_share": float(sorted_items[:max(1, n_items // 100)].sum() / n)},
        "timestamp_range": [int(timestamp.min()), int(timestamp.max())],
        **sample_info,
    }
    truth = None
    if return_truth:
        truth = {"mu": mu_all, "user_factors": user_factors, "user_bias": user_bias,
                 "item_factors": item_factors, "item_bias": item_bias, "item_genre": item_genre,
                 "genre_centers": centers, "genre_names": names[:n_genres]}
    return SyntheticData(ratings=ratings, movies=movies, params=params, truth=truth)


def write_ratings_csv(data: SyntheticData, directory: Path) -> Path:
    """Write MovieLens-format ratings.csv and movies.csv into ``directory``; return the ratings.csv path.

    Titles with commas or quotes are quoted (quotes doubled), as in MovieLens' movies.csv.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ratings_path = directory / "ratings.csv"
    data.ratings.select(
        pl.col("user_id").alias("userId"), pl.col("movie_id").alias("movieId"),
        pl.col("rating").cast(pl.Float64).alias("rating"), pl.col("timestamp").alias("timestamp"),
    ).write_csv(ratings_path, float_precision=1)
    data.movies.select(
        pl.col("movie_id").alias("movieId"), "title", "genres",
    ).write_csv(directory / "movies.csv")
    return ratings_path
