"""Paired contrasts between two arms of a grid: "does A beat B", with its uncertainty.

Both arms ran the same seeds and were scored on the same evaluation items, so the data of a
contrast is one matrix of per-(seed, item) differences

    diff[s, i] = score_A[s, i] - score_B[s, i]        # [S seeds, I items], scores in [0, 1]

whose items may fall in strata (task groups, weighted equally: the tables' "avg" column).
The estimate is the weighted mean difference; its variance comes from a crossed
random-effects model (seeds and items are both samples from larger populations):

    diff[s, i] = mu + a_s + b_i + e_si      var(mean) = var_a / S + var_b / I + var_e / (S I)

estimated by the two-way ANOVA's mean squares within each stratum (`estimate`). It is what a
bootstrap that resamples seeds and items at once (Owen 2007, "The pigeonhole bootstrap",
Ann. Appl. Stat. 1(1); `pigeonhole_bootstrap`) estimates, without its two biases: the
bootstrap counts var_e twice, and it shrinks the seed term by (S - 1) / S, a third at 3 seeds,
so its percentile intervals undercover there (measured: docs/grids.md). The interval and the
p-value use Student's t with S - 1 degrees of freedom, those of the seed term (with one seed,
Satterthwaite's over the items): at 3-5 seeds a normal quantile would be far too narrow, and
Satterthwaite's estimated degrees of freedom fail Holm's tail (docs/grids.md, measured).

The verdict of a family of contrasts (`judge`): Holm-adjusted p < alpha -> "holds" (A > B) or
"reversed"; otherwise "equivalent" when the 95% CI lies inside [-margin, +margin] (two one-sided
tests at 2.5% each) with a spread measured (se > 0), else "inconclusive". The minimum detectable difference at 80% power is
(t_{1-alpha/2} + t_{0.8}) x SE, from the same variance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

VERDICTS = ("holds", "reversed", "inconclusive", "equivalent")
METHODS = ("t", "bootstrap")


# ---------------------------------------------------------------------------- Student's t
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta (Numerical Recipes 3rd ed., 6.4)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf2(t: float, df: float) -> float:
    """Two-sided tail P(|T| >= |t|) of Student's t with `df` degrees of freedom (inf: normal)."""
    if df > 1e5:  # the normal's tail, within 1e-5 relative, where the continued fraction is slow
        return math.erfc(abs(t) / math.sqrt(2.0))
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def _t_pdf(t: float, df: float) -> float:
    if df > 1e5:
        return math.exp(-t * t / 2) / math.sqrt(2 * math.pi)
    return math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
                    - (df + 1) / 2 * math.log1p(t * t / df))


def _normal_quantile(q: float) -> float:
    lo, hi = 0.0, 40.0
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 1 - math.erfc(mid / math.sqrt(2)) / 2 < q else (lo, mid)
    return (lo + hi) / 2


def t_quantile(q: float, df: float) -> float:
    """The q-quantile (q in (0.5, 1)) of Student's t: Newton's method on `t_sf2` from the
    Cornish-Fisher expansion (Abramowitz & Stegun 26.7.5)."""
    if not 0.5 < q < 1:
        raise ValueError(f"t_quantile: q={q} must be in (0.5, 1)")
    z = _normal_quantile(q)
    if df > 1e5:
        return z
    t = z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
    t = min(t, 1e3)
    for _ in range(50):
        step = ((1 - t_sf2(t, df) / 2) - q) / _t_pdf(t, df)
        t = max(t - step, t / 2)  # never past zero: the cdf is convex above it
        if abs(step) < 1e-12 * max(1.0, t):
            break
    return t


# ---------------------------------------------------------------------------- one contrast
@dataclass(frozen=True)
class Estimate:
    """A contrast's mean difference and its uncertainty, in the scores' units (x100: points)."""

    diff: float
    se: float
    df: float  # degrees of freedom of `se`: S - 1; with one seed, Satterthwaite's over the items
    ci: tuple[float, float]  # 95% (1 - alpha) confidence interval
    mdd: float  # minimum detectable difference at 80% power, two-sided alpha
    p: float  # two-sided p-value of "no difference"
    seeds: int
    items: int


def _weights(strata: Sequence[str]) -> tuple[list[np.ndarray], np.ndarray]:
    """Item indices of each stratum, and each stratum's weight (equal: the "avg" column)."""
    names = list(dict.fromkeys(strata))
    index = [np.array([i for i, s in enumerate(strata) if s == g]) for g in names]
    return index, np.full(len(names), 1.0 / len(names))


def stratified_mean(values: np.ndarray, strata: Sequence[str]) -> float:
    """values [S, I] -> the mean over seeds of the strata's means, strata weighted equally."""
    index, W = _weights(strata)
    return float(sum(w * np.asarray(values, dtype=np.float64)[:, ix].mean() for w, ix in zip(W, index)))


def estimate(diff: np.ndarray, strata: Sequence[str] | None = None, alpha: float = 0.05, power: float = 0.8,
             method: Literal["t", "bootstrap"] = "t", resamples: int = 2000, seed: int = 0) -> Estimate:
    """diff [S, I] (seeds x items; [S, 1] for one value per seed) -> Estimate.

    `method="t"` (the rule): crossed-design variance, t with S - 1 degrees of freedom.
    `method="bootstrap"`: percentile interval and p of `pigeonhole_bootstrap` (for comparison)."""
    diff = np.asarray(diff, dtype=np.float64)
    if diff.ndim != 2 or diff.size == 0:
        raise ValueError(f"estimate: diff must be a non-empty [seeds, items] matrix, got shape {list(diff.shape)}")
    if method not in METHODS:
        raise ValueError(f"estimate: method={method!r} is not one of {list(METHODS)}")
    S, I = diff.shape
    strata = ["all"] * I if strata is None else list(strata)
    if len(strata) != I:
        raise ValueError(f"estimate: {len(strata)} strata for {I} items")
    index, W = _weights(strata)
    d = stratified_mean(diff, strata)
    terms: list[tuple[float, float]] = []  # (variance term, its df); a negative term is subtracted
    if S > 1:
        seed_means = sum(w * diff[:, ix].mean(axis=1) for w, ix in zip(W, index))  # [S]
        terms.append((seed_means.var(ddof=1) / S, S - 1))
    for w, ix in zip(W, index):
        n = len(ix)
        if n < 2:
            continue
        block = diff[:, ix]  # [S, n]
        item_means = block.mean(axis=0)  # [n]
        terms.append((w * w * item_means.var(ddof=1) / n, n - 1))
        if S > 1:  # the residual var_e / (S n) sits in both terms above: counted once (ANOVA, crossed)
            resid = block - block.mean(axis=1, keepdims=True) - item_means + block.mean()
            mse = (resid ** 2).sum() / ((S - 1) * (n - 1))
            terms.append((-w * w * mse / (S * n), (S - 1) * (n - 1)))
    var = sum(v for v, _ in terms)
    positive = max((v for v, _ in terms if v > 0), default=0.0)
    var = max(var, positive)  # the subtraction never leaves less than the largest component
    se = math.sqrt(var) if var > 1e-24 else 0.0  # below that, float rounding of equal differences
    denom = sum(v * v / k for v, k in terms if k > 0)
    # degrees of freedom: with several seeds, those of the seed term (S - 1, the "containment"
    # rule): Satterthwaite's estimate, random itself, is large exactly when the seed term is
    # underestimated by chance, and at 3 seeds it put 12% of null tables past Holm (docs/grids.md)
    df = float(S - 1) if S > 1 else (var * var / denom if denom > 0 else math.inf)
    if method == "bootstrap":
        means = pigeonhole_bootstrap(diff, strata, resamples, seed)
        lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
        p = min(1.0, 2 * min((means <= 0).mean(), (means >= 0).mean()))
        z = t_quantile(1 - alpha / 2, math.inf) + t_quantile(power, math.inf)
        return Estimate(d, float(means.std()), math.inf, (float(lo), float(hi)), z * float(means.std()), float(p), S, I)
    if not terms:  # one seed and one item per stratum: nothing replicated, no variance to estimate
        return Estimate(d, math.inf, math.nan, (-math.inf, math.inf), math.inf, 1.0, S, I)
    if se == 0.0:  # every pair differs by the same amount: no uncertainty left to estimate
        return Estimate(d, 0.0, df, (d, d), 0.0, 1.0 if d == 0 else 0.0, S, I)
    half = t_quantile(1 - alpha / 2, df) * se
    mdd = (t_quantile(1 - alpha / 2, df) + t_quantile(power, df)) * se
    return Estimate(d, se, df, (d - half, d + half), mdd, t_sf2(d / se, df), S, I)


def pigeonhole_bootstrap(diff: np.ndarray, strata: Sequence[str], resamples: int, seed: int = 0) -> np.ndarray:
    """Means of `resamples` two-level resamples of diff [S, I]: seeds with replacement, and
    items with replacement within each stratum, crossed (Owen 2007) -> [resamples]."""
    rng = np.random.default_rng(seed)
    S, _ = diff.shape
    index, W = _weights(strata)
    seed_counts = rng.multinomial(S, np.full(S, 1.0 / S), size=resamples)  # [B, S]
    out = np.zeros(resamples)
    for w, ix in zip(W, index):
        item_counts = rng.multinomial(len(ix), np.full(len(ix), 1.0 / len(ix)), size=resamples)  # [B, n]
        # sum over the resampled (seed, item) cells = counts_s^T diff counts_i, per resample
        out += w * ((seed_counts @ diff[:, ix]) * item_counts).sum(axis=1) / (S * len(ix))
    return out


# ---------------------------------------------------------------------------- a family
def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (familywise error <= alpha under any dependence)."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda k: pvalues[k])
    adjusted, running = [0.0] * m, 0.0
    for rank, k in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[k]))
        adjusted[k] = running
    return adjusted


def verdict(est: Estimate, p_adjusted: float, margin: float | None, alpha: float = 0.05) -> str:
    """holds / reversed (Holm-adjusted p < alpha, by the sign), equivalent (CI inside
    [-margin, margin]), else inconclusive. `margin` in the scores' units (0.02 = 2 points)."""
    if p_adjusted < alpha and est.diff != 0:
        return "holds" if est.diff > 0 else "reversed"
    # equivalence needs a measured spread: with no discordant pair (both arms at the floor) the
    # zero-width interval reflects what the data cannot show, not a precise agreement
    if margin is not None and est.se > 0 and -margin < est.ci[0] and est.ci[1] < margin:
        return "equivalent"
    return "inconclusive"


@dataclass(frozen=True)
class Contrast:
    """One judged contrast of a family: `a` against `b` on `quantity`."""

    a: str
    b: str
    quantity: str
    estimate: Estimate
    p_adjusted: float
    verdict: str


def judge(family: Sequence[tuple[str, str, str, np.ndarray, Sequence[str] | None]], margin: float | None = None,
          alpha: float = 0.05, method: Literal["t", "bootstrap"] = "t") -> list[Contrast]:
    """[(a, b, quantity, diff [S, I], strata)] -> their Contrasts, Holm-corrected together."""
    estimates = [estimate(diff, strata, alpha, method=method) for _, _, _, diff, strata in family]
    adjusted = holm([e.p for e in estimates])
    return [Contrast(a, b, q, e, p, verdict(e, p, margin, alpha))
            for (a, b, q, _, _), e, p in zip(family, estimates, adjusted)]


def paired(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> tuple[np.ndarray, list[str], list[str]]:
    """{seed: {item: score}} of two arms -> (diff [S, I], seeds, items) over the seeds both
    arms have and the items every one of those runs scored (sorted, so the pairing is by name)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return np.zeros((0, 0)), [], []
    items = sorted(set.intersection(*(set(arm[s]) for arm in (a, b) for s in seeds)))
    diff = np.array([[a[s][i] - b[s][i] for i in items] for s in seeds], dtype=np.float64).reshape(len(seeds), len(items))
    return diff, seeds, items
