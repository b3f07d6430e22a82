"""experiments.contrasts: paired contrasts over seeds x items, Holm, verdicts; checked against
closed forms (Student's t, the paired t-test) and against Monte Carlo truth."""

import math

import numpy as np
import pytest

from experiments.contrasts import (Estimate, estimate, holm, judge, paired, pigeonhole_bootstrap, t_quantile, t_sf2,
                                   verdict)


def test_student_t_matches_tabulated_values():
    # tables of Student's t (e.g. Abramowitz & Stegun 26.10)
    assert t_quantile(0.975, 2) == pytest.approx(4.302653, abs=1e-5)
    assert t_quantile(0.975, 4) == pytest.approx(2.776445, abs=1e-5)
    assert t_quantile(0.8, 4) == pytest.approx(0.940965, abs=1e-5)
    assert t_quantile(0.975, math.inf) == pytest.approx(1.959964, abs=1e-5)
    assert t_sf2(2.0, 10) == pytest.approx(0.073388, abs=1e-6)
    assert t_sf2(t_quantile(0.975, 7.3), 7.3) == pytest.approx(0.05, abs=1e-9)


def test_one_value_per_seed_is_the_paired_t_test():
    diff = np.array([[0.03], [0.05], [0.01], [0.04]])  # [S=4, I=1]
    e = estimate(diff)
    d, sd = diff.mean(), diff.std(ddof=1)
    se = sd / 2
    assert (e.diff, e.se, e.df) == pytest.approx((d, se, 3))
    assert e.ci == pytest.approx((d - 3.182446 * se, d + 3.182446 * se), abs=1e-6)
    assert e.p == pytest.approx(t_sf2(d / se, 3))
    assert e.mdd == pytest.approx((3.182446 + 0.978472) * se, abs=1e-6)


def _simulate(rng, S, I, seed_sd, strata=1, item_arm_sd=0.3, shift=0.0):
    """Two arms with the same items: item difficulty, an item x arm effect, a seed x arm
    effect (training randomness) and Bernoulli outcomes -> diff [S, I], strata."""
    b = rng.normal(0, 1, I)
    logits = [b[None] + rng.normal(0, item_arm_sd, I)[None] + rng.normal(0, seed_sd, (S, 1)) + shift * (arm == 0)
              for arm in (0, 1)]
    a, c = ((rng.random((S, I)) < 1 / (1 + np.exp(-x))).astype(float) for x in logits)
    return a - c, [str(i * strata // I) for i in range(I)]


@pytest.mark.parametrize("S, I, seed_sd", [(3, 120, 0.3), (5, 400, 0.0)])
def test_interval_covers_the_truth_95_percent(S, I, seed_sd):
    """Under no true difference the 95% CI holds 0 in 95% of 400 grids; a binomial(400, 0.95)
    lies in [358, 400] with probability > 0.999 (and an interval missing the seed term or
    using normal quantiles at 3 seeds falls well below)."""
    rng = np.random.default_rng(S)
    covered = sum(e.ci[0] < 0 < e.ci[1] for e in (estimate(*_simulate(rng, S, I, seed_sd, strata=2))
                                                 for _ in range(400)))
    assert 358 <= covered


def test_standard_error_is_the_spread_of_the_estimate():
    """The mean of se^2 over replicates equals the variance of the estimate across them."""
    rng = np.random.default_rng(0)
    estimates = [estimate(*_simulate(rng, 4, 100, 0.4, strata=2)) for _ in range(400)]
    spread = np.var([e.diff for e in estimates], ddof=1)
    assert np.mean([e.se ** 2 for e in estimates]) == pytest.approx(spread, rel=0.2)


def test_strata_weigh_equally_like_the_avg_column():
    diff = np.zeros((2, 4))
    diff[:, 0] = 1.0
    e = estimate(diff, ["a", "a", "b", "b"])
    assert e.diff == pytest.approx(0.25)
    e = estimate(diff, ["a", "b", "b", "b"])  # stratum a is the one item: half the weight
    assert e.diff == pytest.approx(0.5)


def test_bootstrap_resamples_seeds_and_items():
    diff = np.array([[0.0], [0.1], [0.2], [0.6]])  # items fixed: the seed bootstrap of a mean
    means = pigeonhole_bootstrap(diff, ["all"], 20000, seed=1)
    assert means.var() == pytest.approx(diff.var(ddof=0) / 4, rel=0.05)  # (S-1)/S x the t rule's se^2
    assert means.mean() == pytest.approx(diff.mean(), abs=0.005)
    e = estimate(diff, method="bootstrap", resamples=4000)
    assert e.ci[0] < diff.mean() < e.ci[1] and e.df == math.inf


def test_nothing_replicated_is_never_a_verdict():
    e = estimate(np.array([[0.3]]))  # one run per side, one value: no variance to estimate
    assert (e.p, e.se, e.ci) == (1.0, math.inf, (-math.inf, math.inf))
    assert verdict(e, 1.0, 0.02) == "inconclusive"


def test_no_spread_means_no_uncertainty():
    assert estimate(np.zeros((3, 5))).p == 1.0
    e = estimate(np.full((3, 5), 0.1))
    assert (e.se, e.p) == (0.0, 0.0) and e.ci == pytest.approx((0.1, 0.1))


def test_holm_step_down():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert holm([]) == []


def _est(diff, lo, hi, p=0.5):
    return Estimate(diff, 0.01, 10, (lo, hi), 0.03, p, 3, 60)


def test_verdicts():
    assert verdict(_est(0.05, 0.02, 0.08), 0.01, None) == "holds"
    assert verdict(_est(-0.05, -0.08, -0.02), 0.01, None) == "reversed"
    assert verdict(_est(0.05, 0.02, 0.08), 0.051, None) == "inconclusive"  # significant alone, not after Holm
    assert verdict(_est(0.001, -0.015, 0.017), 0.8, 0.02) == "equivalent"
    assert verdict(_est(0.001, -0.015, 0.021), 0.8, 0.02) == "inconclusive"  # the CI leaves the margin
    assert verdict(_est(0.001, -0.015, 0.017), 0.8, None) == "inconclusive"  # no margin, no equivalence
    floor = estimate(np.zeros((3, 60)))  # both arms wrong on every item: nothing measured
    assert verdict(floor, 1.0, 0.02) == "inconclusive"


def test_judge_corrects_across_the_family():
    weak = np.array([[0.031], [0.012], [0.02], [0.025], [0.018]])  # paired t: p ~ 0.003
    null = np.array([[0.01], [-0.01], [0.02], [-0.02], [0.0]])  # p = 1
    alone = judge([("a", "b", "avg", weak, None)])[0]
    assert alone.verdict == "holds" and alone.p_adjusted == alone.estimate.p
    family = judge([("a", "b", "avg", weak, None)] + [(f"n{k}", "b", "avg", null + 0.001 * k, None) for k in range(30)])
    assert [c.p_adjusted for c in family] == holm([c.estimate.p for c in family])
    assert family[0].p_adjusted == pytest.approx(31 * alone.estimate.p)
    assert family[0].verdict == "inconclusive"  # one of 31 contrasts at p ~ 0.003: not enough


def test_paired_matches_seeds_and_items_by_name():
    a = {"s0": {"k1": 1.0, "k2": 0.0, "k3": 1.0}, "s1": {"k1": 1.0, "k2": 1.0, "k3": 1.0}, "s2": {"k1": 0.0}}
    b = {"s1": {"k2": 0.0, "k1": 1.0, "k3": 0.0}, "s0": {"k1": 0.0, "k2": 0.0, "k3": 1.0}}
    diff, seeds, items = paired(a, b)
    assert seeds == ["s0", "s1"] and items == ["k1", "k2", "k3"]
    np.testing.assert_array_equal(diff, [[1, 0, 0], [0, 1, 1]])
    assert paired(a, {"s9": {}})[1] == []


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match=r"\[seeds, items\] matrix, got shape \[3\]"):
        estimate(np.zeros(3))
    with pytest.raises(ValueError, match="method='z' is not one of"):
        estimate(np.zeros((2, 2)), method="z")
    with pytest.raises(ValueError, match="1 strata for 2 items"):
        estimate(np.zeros((2, 2)), ["a"])
