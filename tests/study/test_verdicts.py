"""The statistics of compare's paired verdicts (glm_experiments.study.verdicts), on simulated per-sample scores.

No training, no MLflow. The simulations are seeded, so every number here is the same on every run.
"""

from __future__ import annotations

import itertools
import json
import math
import time

import numpy as np
import pytest
from scipy import stats

from glm_experiments.errors import UserError
from glm_experiments.study import verdicts as v
from glm_experiments.study import votes

N_SIMULATIONS = 500


def simulated_pair(rng: np.random.Generator, n: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample scores of a baseline and a setting on the same n dev samples, ROUGE-like (0-100 scale).

    Each sample has a difficulty (skewed: Beta(2, 5) * 100) both runs share; each run adds its own heavy-tailed
    noise (t, 5 degrees of freedom). The setting's true mean difference is exactly ``shift``.
    """
    difficulty = 100 * rng.beta(2, 5, size=n)
    baseline = difficulty + 8 * rng.standard_t(5, size=n)
    setting = difficulty + shift + 8 * rng.standard_t(5, size=n)
    return setting, baseline


def simulate(shift: float, n: int, seed: int) -> list[v.PairedResult]:
    rng = np.random.default_rng(seed)
    results = []
    for i in range(N_SIMULATIONS):  # one comparison per simulation; each comparison's resamples are vectorised
        setting, baseline = simulated_pair(rng, n, shift)
        results.append(v.paired_verdict(setting - baseline, seed=i, n_bootstrap=2000, n_permutations=2000))
    return results


# ------------------------------------------------------------------------------------------ calibration
def test_no_true_difference_gives_about_5_percent_false_positives():
    results = simulate(shift=0.0, n=60, seed=20240)
    p_rate = np.mean([r.p_value < 0.05 for r in results])
    ci_rate = np.mean([r.verdict != v.WITHIN_NOISE for r in results])
    assert 0.02 <= p_rate <= 0.08, p_rate
    assert 0.02 <= ci_rate <= 0.08, ci_rate
    noise = [r for r in results if r.verdict == v.WITHIN_NOISE]
    assert all(r.samples_needed is not None and r.samples_needed > r.n_samples for r in noise if r.delta)


def test_the_95_percent_interval_covers_a_known_shift_93_to_97_percent_of_the_time():
    shift = 3.0
    results = simulate(shift=shift, n=100, seed=7)
    coverage = np.mean([r.ci_low <= shift <= r.ci_high for r in results])
    assert 0.93 <= coverage <= 0.97, coverage
    assert abs(np.mean([r.delta for r in results]) - shift) < 0.2  # delta is unbiased


def test_a_large_shift_is_better_and_a_large_drop_worse():
    rng = np.random.default_rng(3)
    setting, baseline = simulated_pair(rng, 300, 10.0)
    assert v.paired_verdict(setting - baseline).verdict == v.BETTER
    assert v.paired_verdict(baseline - setting).verdict == v.WORSE
    assert v.paired_verdict(setting - baseline).p_value < 0.001


# ------------------------------------------------------------------------------------------ against plain numpy
FIXED = np.array([4.1, -2.0, 7.5, 0.3, 3.3, -1.2, 5.8, 2.2, -0.7, 6.1, 1.4, 3.9, -3.1, 2.8, 0.9, 4.4, 1.1, -0.4,
                  5.2, 2.6, 3.0, -1.9, 0.2, 4.8, 1.7, 2.9, -2.4, 3.6, 0.8, 1.5])


def test_a_fixed_example_equals_an_independent_numpy_computation():
    d = FIXED
    n = d.size
    result = v.paired_verdict(d, seed=11)
    assert result.delta == pytest.approx(d.sum() / n, abs=1e-12)
    assert result.n_samples == n
    assert result.sd == pytest.approx(math.sqrt(((d - d.mean()) ** 2).sum() / (n - 1)))

    # bootstrap interval: a plain numpy percentile bootstrap with another generator and 50,000 resamples
    rng = np.random.default_rng(12345)
    means = d[rng.integers(0, n, size=(50_000, n))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    se = d.std(ddof=1) / math.sqrt(n)
    # the Monte Carlo sd of a 4,000-resample endpoint is about 0.05 se here (measured over 100 seeds): 4 sd
    assert result.ci_low == pytest.approx(low, abs=0.2 * se)
    assert result.ci_high == pytest.approx(high, abs=0.2 * se)
    # ... and close to the t interval it approximates
    t_low, t_high = stats.t.interval(0.95, n - 1, loc=d.mean(), scale=se)
    assert result.ci_low == pytest.approx(t_low, abs=0.3 * se) and result.ci_high == pytest.approx(t_high, abs=0.3 * se)

    # permutation p-value: scipy's paired permutation test with many resamples
    reference = stats.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=50_000,
                                       alternative="two-sided", random_state=5).pvalue
    assert result.p_value == pytest.approx(reference, abs=0.01)
    assert result.p_value == pytest.approx(stats.ttest_1samp(d, 0).pvalue, abs=0.02)

    assert result.verdict == v.BETTER  # the interval lies above 0


def test_the_sign_flip_test_is_exact_for_small_samples():
    d = np.array([1.5, -0.5, 2.0, 0.25, 3.0, -1.0, 0.75, 1.25])
    observed = abs(d.sum())
    flips = [abs(np.dot(signs, d)) >= observed - 1e-12 for signs in itertools.product((-1, 1), repeat=d.size)]
    assert v.paired_verdict(d, seed=0).p_value == pytest.approx(np.mean(flips), abs=1e-12)
    assert v.paired_verdict(d, seed=99).p_value == v.paired_verdict(d, seed=0).p_value  # no randomness at all


def test_samples_needed_is_the_paired_power_formula():
    # n = ((z_0.975 + z_0.8) * sd / |delta|)^2, rounded up
    assert v.samples_needed(0.4, 4.28) == math.ceil(((1.959964 + 0.841621) * 4.28 / 0.4) ** 2) == 899
    assert v.samples_needed(-0.4, 4.28) == 899
    assert v.samples_needed(0.0, 3.0) is None
    rng = np.random.default_rng(8)
    d = 0.4 + 10 * rng.standard_normal(200)
    result = v.paired_verdict(d, seed=1)
    assert result.verdict == v.WITHIN_NOISE
    assert result.samples_needed == math.ceil((2.8015852 * d.std(ddof=1) / abs(d.mean())) ** 2)
    # ... and a study of that size does detect such a difference about 80 % of the time (normal approximation)
    n, power_se = result.samples_needed, abs(d.mean()) / (d.std(ddof=1) / math.sqrt(result.samples_needed))
    assert stats.norm.cdf(power_se - 1.959964) == pytest.approx(0.80, abs=0.01), n


def test_results_are_reproducible_and_seeded():
    a = v.paired_verdict(FIXED, seed=3)
    assert v.paired_verdict(FIXED, seed=3) == a
    assert v.paired_verdict(FIXED, seed=4).ci_low != a.ci_low  # the seed is used


def test_holm_adjustment():
    assert v.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert v.holm([0.2, None, 0.9]) == [pytest.approx(0.4), None, pytest.approx(0.9)]
    assert v.holm([]) == []
    assert v.holm([0.8, 0.7]) == [1.0, 1.0]  # capped at 1


# ------------------------------------------------------------------------------------------ seeds, the table
def test_pooling_averages_each_sample_over_seeds():
    seeds = [{"x": 1.0, "y": 2.0, "z": 9.0}, {"x": 3.0, "y": 4.0}, {"y": 0.0, "x": 2.0}]
    assert v.pool_seeds(seeds) == {"x": 2.0, "y": 2.0}  # z: not scored by every seed
    assert v.pool_seeds([{"a": 1.0}]) == {"a": 1.0}
    assert v.seed_summary([1.0, 2.0, 3.0]) == (2.0, 1.0, 3)
    assert v.seed_summary([5.0]) == (5.0, None, 1)
    assert v.seed_summary([]) == (None, None, 0)


def scores_for(n_settings: int, metrics: list[str], n: int, n_seeds: int, shifts: dict, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    difficulty = 100 * rng.beta(2, 5, size=n)
    keys = [f"input {i}" for i in range(n)]
    out = {}
    for s in range(n_settings):
        name = f"src={512 * 2 ** s}"
        out[name] = {m: [dict(zip(keys, (difficulty + shifts.get((s, m), 0.0) + 8 * rng.standard_normal(n)).tolist()))
                         for _ in range(n_seeds)] for m in metrics}
    return out


def test_the_table_pools_seeds_holm_adjusts_and_names_its_baseline():
    metrics = ["BLEU-4", "ROUGE-L"]
    scores = scores_for(3, metrics, 400, 3, {(1, "ROUGE-L"): 6.0, (2, "ROUGE-L"): -6.0})
    table = v.verdict_table(scores)
    assert table.baseline == "src=512"
    assert [(r.setting, r.metric) for r in table.rows] == [
        ("src=1024", "BLEU-4"), ("src=1024", "ROUGE-L"), ("src=2048", "BLEU-4"), ("src=2048", "ROUGE-L")]
    by = {(r.setting, r.metric): r for r in table.rows}
    assert by["src=1024", "ROUGE-L"].verdict == v.BETTER
    assert by["src=2048", "ROUGE-L"].verdict == v.WORSE
    assert all(r.n_seeds == 3 and r.n_samples == 400 for r in table.rows)
    assert [r.p_adjusted for r in table.rows] == v.holm([r.p_value for r in table.rows])
    assert all(r.p_adjusted >= r.p_value for r in table.rows)

    # delta uses each sample's score averaged over the seeds
    pooled_setting = v.pool_seeds(scores["src=1024"]["ROUGE-L"])
    pooled_base = v.pool_seeds(scores["src=512"]["ROUGE-L"])
    assert by["src=1024", "ROUGE-L"].delta == pytest.approx(
        np.mean([pooled_setting[k] - pooled_base[k] for k in pooled_base]))

    payload = json.loads(json.dumps(table.to_json()))
    assert payload["baseline"] == "src=512"
    assert set(payload["rows"][0]) == {"metric", "setting", "baseline", "delta", "ci_low", "ci_high", "p_value",
                                       "p_adjusted", "n_samples", "n_seeds", "verdict", "samples_needed",
                                       "evaluated_at"}  # the issue's fields + the cross-evaluation's column

    # another baseline; rows do not depend on the table's order (each comparison has its own seed)
    other = v.verdict_table(scores, baseline="src=1024")
    assert other.baseline == "src=1024" and {r.setting for r in other.rows} == {"src=512", "src=2048"}
    reordered = v.verdict_table({k: scores[k] for k in ["src=512", "src=2048", "src=1024"]})
    assert {(r.setting, r.metric): r.ci_low for r in reordered.rows} == {k: r.ci_low for k, r in by.items()}
    assert v.verdict_table(scores).to_json() == table.to_json()

    metrics_logged = table.metrics()
    assert metrics_logged["verdict/src_1024/ROUGE-L/delta"] == by["src=1024", "ROUGE-L"].delta  # '=': not in MLflow names
    assert {k.rsplit("/", 1)[1] for k in metrics_logged} == {"delta", "ci_low", "ci_high", "p"}


def test_matching_is_by_sample_key_not_position():
    base = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 10.0}
    setting = {"d": 12.0, "c": 5.0, "b": 4.0, "e": 100.0}  # other order, one sample the baseline lacks
    table = v.verdict_table({"base": {"m": [base]}, "new": {"m": [setting]}})
    assert table.rows[0].n_samples == 3 and table.rows[0].delta == pytest.approx(2.0)


def test_six_settings_five_metrics_1000_samples_3_seeds_under_5_seconds():
    metrics = ["BLEU-4", "ROUGE-1", "ROUGE-2", "ROUGE-L", "F1"]
    scores = scores_for(6, metrics, 1000, 3, {(3, "ROUGE-L"): 2.0})
    start = time.perf_counter()
    table = v.verdict_table(scores)
    seconds = time.perf_counter() - start
    assert len(table.rows) == 25
    assert seconds < 5, f"{seconds:.1f} s"


# ------------------------------------------------------------------------------------------ sentences
def row(metric, delta, low, high, verdict, needed=None):
    return v.VerdictRow(metric=metric, setting="src=1024", baseline="src=512", delta=delta, ci_low=low, ci_high=high,
                        p_value=0.01, p_adjusted=0.02, n_samples=200, n_seeds=1, verdict=verdict,
                        samples_needed=needed)


def test_sentences_read_like_the_issue():
    rows = [row("ROUGE-L", 23.5, 17.1, 29.8, v.BETTER), row("BLEU-4", 0.4, -1.2, 2.0, v.WITHIN_NOISE, 899)]
    assert v.setting_sentence(rows) == ("src=1024 vs src=512: ROUGE-L +23.5 [17.1, 29.8], better; BLEU-4 +0.4 "
                                        "[-1.2, 2.0], within noise: about 900 dev samples would detect +0.4")
    assert v.row_phrase(row("acc.", -0.031, -0.052, -0.011, v.WORSE)) == "acc. -0.031 [-0.052, -0.011], worse"
    assert v.row_phrase(row("F1", 0.0, -1.0, 1.0, v.WITHIN_NOISE)).endswith("within noise: no difference observed")
    assert v.row_phrase(row("ROUGE-1", 0.031, -0.9, 1.0, v.WITHIN_NOISE, 199078)) == (
        "ROUGE-1 +0.03 [-0.9, 1.0], within noise: about 200,000 dev samples would detect +0.03")  # not +0.0
    assert v.about(873) == "870" and v.about(12345) == "12,000" and v.about(57) == "57"
    table = v.VerdictTable("src=512", rows)
    assert table.sentences() == [v.setting_sentence(rows)]


# ------------------------------------------------------------------------------------------ human votes
def test_votes_get_a_sign_test_beside_the_wilson_interval():
    tally = votes.vote_verdict(14, 6)
    assert tally.p_value == pytest.approx(stats.binomtest(14, 20).pvalue) == pytest.approx(0.1153, abs=1e-4)
    assert tally.sentence() == "A preferred 14 of 20 decisive votes, 70 % [48, 85], p = 0.12, within noise"
    assert votes.vote_verdict(6, 14).sentence() == "B preferred 14 of 20 decisive votes, 70 % [48, 85], p = 0.12, within noise"
    assert votes.vote_verdict(6, 14).verdict == v.WITHIN_NOISE
    strong = votes.vote_verdict(2, 18)
    assert strong.verdict == v.WORSE  # for a
    assert strong.sentence("lora", "freeze") == (
        "freeze preferred 18 of 20 decisive votes, 90 % [70, 97], p < 0.001, better")
    assert votes.vote_verdict(0, 0).p_value is None and votes.vote_verdict(0, 0).verdict == v.WITHIN_NOISE
    assert votes.wilson_interval(14, 20) == pytest.approx((0.4810, 0.8545), abs=5e-4)
    with pytest.raises(UserError, match="negative"):
        votes.vote_verdict(-1, 3)


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_is_one_line_user_error():
    fine = {"x": 1.0, "y": 2.0}
    with pytest.raises(UserError, match="at least 2") as caught:
        v.verdict_table({"a": {"m": [{"x": 1.0, "y": 2.0}]}, "b": {"m": [{"x": 2.0, "z": 1.0}]}})
    assert "\n" not in str(caught.value) and "b vs a" in str(caught.value)
    with pytest.raises(UserError, match="no per-sample ROUGE-L") as caught:
        v.verdict_table({"a": {"BLEU-4": [fine], "ROUGE-L": [fine]}, "b": {"BLEU-4": [fine]}})
    assert "\n" not in str(caught.value)
    with pytest.raises(UserError, match="no per-sample BLEU-4"):
        v.verdict_table({"a": {"BLEU-4": [{}]}, "b": {"BLEU-4": [fine]}})
    with pytest.raises(UserError, match="baseline 'c'"):
        v.verdict_table({"a": {"m": [fine]}, "b": {"m": [fine]}}, baseline="c")
    with pytest.raises(UserError, match="at least 2 settings"):
        v.verdict_table({"a": {"m": [fine]}})
    with pytest.raises(UserError, match="at least 2 shared samples"):
        v.paired_verdict([1.0])
    with pytest.raises(UserError, match="NaN"):
        v.paired_verdict([1.0, float("nan"), 2.0])
