"""Paired verdicts: is a setting better than the baseline on the same dev samples, or within noise?

Pure numpy / scipy, no MLflow: ``compare`` feeds it the per-sample scores it read from the runs' prediction
tables and writes what it returns (``verdicts.json``, the sentences, the verdict metrics).

For one setting, one metric, against the baseline, over the dev samples both evaluated (matched by sample key,
e.g. the input text):

* ``delta``: the mean of the per-sample differences (setting - baseline);
* ``ci_low`` / ``ci_high``: a 95 % percentile interval of that mean by a paired bootstrap over samples
  (:data:`N_BOOTSTRAP` resamples, seeded: the same inputs give the same interval);
* ``p_value``: a two-sided paired permutation test (sign flips of the differences): exact (every sign pattern)
  for up to :data:`EXACT_MAX_N` samples, else :data:`N_PERMUTATIONS` seeded random sign patterns, with the
  ``(1 + hits) / (1 + resamples)`` correction that keeps a random-resample p-value valid;
* ``p_adjusted``: Holm's step-down adjustment across the whole table (every setting x metric);
* ``verdict``: ``better`` / ``worse`` when the interval excludes 0, else ``within noise``;
* ``samples_needed`` (within noise only): how many dev samples would detect a difference of the observed size
  at 80 % power in a two-sided 5 % test, from the observed paired standard deviation (see
  :func:`samples_needed`).

Seeds are pooled: runs that differ only in their seed are one setting; a sample's score for the setting is its
score averaged over that setting's seeds (:func:`pool_seeds`), and ``n_seeds`` says how many there were.

Human A/B votes get the matching test in study/votes.py: a two-sided sign (binomial) test over the decisive
votes beside the Wilson interval of the win rate, and the same three-way verdict.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import stats

from glm_experiments.errors import UserError

BETTER, WORSE, WITHIN_NOISE = "better", "worse", "within noise"
CONFIDENCE = 0.95
POWER = 0.80
N_BOOTSTRAP = 4000      # bootstrap resamples per comparison (the issue asks for >= 2,000)
N_PERMUTATIONS = 4000   # random sign patterns per comparison where the test is not exact
EXACT_MAX_N = 12        # up to 2**12 = 4,096 sign patterns: enumerate them all (an exact p-value)
DEFAULT_SEED = 0
_CHUNK = 4_000_000      # resample matrix entries per block: bounds memory for large dev sets (~48 MB a block)

Z_CONFIDENCE = float(stats.norm.ppf(1 - (1 - CONFIDENCE) / 2))  # 1.95996...
Z_POWER = float(stats.norm.ppf(POWER))                          # 0.84162...


class VerdictError(UserError):
    """Bad input for a paired comparison: one line, no traceback."""


# ------------------------------------------------------------------------------------------ pooling seeds
def pool_seeds(per_seed: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """One setting's per-sample scores averaged over its seeds: ``{sample_key: mean score}``.

    ``per_seed`` is one ``{sample_key: score}`` dict per seed (run). Only the samples every seed scored are kept,
    so each pooled score averages the same number of seeds (runs of one setting evaluate the same dev set; a
    sample one seed lacks would otherwise mix one-seed and three-seed averages). The order is the first seed's.
    """
    if not per_seed:
        return {}
    shared = set(per_seed[0]).intersection(*per_seed[1:]) if len(per_seed) > 1 else set(per_seed[0])
    return {key: sum(float(seed[key]) for seed in per_seed) / len(per_seed) for key in per_seed[0] if key in shared}


def seed_summary(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sd, n_seeds) of one setting's metric over its seeds; sd (ddof=1) is None for fewer than 2 seeds."""
    xs = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if xs.size == 0:
        return None, None, 0
    sd = float(xs.std(ddof=1)) if xs.size > 1 else None
    return float(xs.mean()), sd, int(xs.size)


def paired_differences(setting: Mapping[str, float], baseline: Mapping[str, float]) -> tuple[np.ndarray, list[str]]:
    """setting - baseline over the sample keys both scored, in the baseline's order."""
    keys = [key for key in baseline if key in setting]
    diffs = np.fromiter((setting[k] - baseline[k] for k in keys), dtype=float, count=len(keys))
    return diffs, keys


# ------------------------------------------------------------------------------------------ one comparison
def comparison_seed(seed: int, *names: str) -> np.random.SeedSequence:
    """A seed for one comparison from the table's seed and its names: stable across processes and row order."""
    return np.random.SeedSequence([seed, *(zlib.crc32(name.encode("utf-8")) for name in names)])


def _columns(diffs: np.ndarray) -> np.ndarray:
    d = np.asarray(diffs, dtype=float)
    return d[:, None] if d.ndim == 1 else d


def bootstrap_ci(diffs: np.ndarray, rng: np.random.Generator, n_resamples: int = N_BOOTSTRAP,
                 confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray] | tuple[float, float]:
    """Percentile interval of the mean of ``diffs`` by resampling samples with replacement (vectorised).

    ``diffs``: one comparison (n,) or several over the same samples (n, metrics): one resample of the samples
    serves every column (the paired bootstrap of a table row). A resample's mean is ``counts @ diffs / n``, with
    ``counts`` how often it drew each sample: one matrix product for every column, in blocks of resamples.
    """
    d = _columns(diffs)
    n = d.shape[0]
    means = np.empty((n_resamples, d.shape[1]))
    block = max(1, _CHUNK // n)
    for start in range(0, n_resamples, block):  # blocks of resamples, not one resample at a time
        rows = min(n_resamples, start + block) - start
        drawn = rng.integers(0, n, size=(rows, n), dtype=np.int32) + (np.arange(rows, dtype=np.int32) * n)[:, None]
        counts = np.bincount(drawn.ravel(), minlength=rows * n).reshape(rows, n).astype(float)  # BLAS, not int
        means[start:start + rows] = counts @ d / n
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail], axis=0)
    return (float(low[0]), float(high[0])) if np.ndim(diffs) == 1 else (low, high)


def sign_flip_p(diffs: np.ndarray, rng: np.random.Generator, n_resamples: int = N_PERMUTATIONS) -> float | np.ndarray:
    """Two-sided p-value of a paired permutation test: under "no difference" each difference's sign is a coin flip.

    The statistic is |sum of differences|. Up to :data:`EXACT_MAX_N` samples every sign pattern is enumerated
    (exact); beyond, ``n_resamples`` random patterns, p = (1 + hits) / (1 + n_resamples). ``diffs`` as for
    :func:`bootstrap_ci`: (n,) or (n, metrics), one set of sign patterns for every column.
    """
    d = _columns(diffs)
    n = d.shape[0]
    observed = np.abs(d.sum(axis=0))
    tolerance = 1e-9 * np.maximum(1.0, np.abs(d).sum(axis=0))  # float noise must not turn a tie into a miss
    if n <= EXACT_MAX_N:
        patterns = ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1) * 2.0 - 1
        p = np.mean(np.abs(patterns @ d) >= observed - tolerance, axis=0)
    else:
        hits = np.zeros(d.shape[1], dtype=np.int64)
        block = max(1, _CHUNK // n)
        total = d.sum(axis=0)
        for start in range(0, n_resamples, block):
            rows = min(n_resamples, start + block) - start
            # 8 coin flips per random byte; flipping the samples in `flip` turns the sum into total - 2 * their sum
            flip = np.unpackbits(rng.integers(0, 256, size=(rows, (n + 7) // 8), dtype=np.uint8), axis=1)[:, :n]
            hits += np.count_nonzero(np.abs(total - 2 * (flip.astype(float) @ d)) >= observed - tolerance, axis=0)
        p = (1 + hits) / (1 + n_resamples)
    return float(p[0]) if np.ndim(diffs) == 1 else np.asarray(p, dtype=float)


def samples_needed(delta: float, sd: float, z_alpha: float = Z_CONFIDENCE, z_power: float = Z_POWER) -> int | None:
    """Dev samples that would detect a true mean difference ``delta`` at 80 % power (two-sided, 5 %).

    The normal approximation to the paired t-test: the mean of n paired differences with standard deviation sd
    has standard error sd / sqrt(n); it is detected with power 1 - beta when |delta| >= (z_{1-alpha/2} + z_{1-beta})
    * sd / sqrt(n), i.e. n = ((z_0.975 + z_0.8) * sd / |delta|)^2 = (2.80 * sd / |delta|)^2, rounded up.
    None when delta is 0 (no observed difference to detect); 2 at least (a paired sd needs two samples).
    """
    if delta == 0 or not math.isfinite(delta) or not math.isfinite(sd):
        return None
    return max(2, math.ceil(((z_alpha + z_power) * sd / abs(delta)) ** 2))


@dataclass
class PairedResult:
    delta: float
    ci_low: float
    ci_high: float
    p_value: float
    n_samples: int
    sd: float                    # standard deviation of the paired differences (ddof=1)
    verdict: str
    samples_needed: int | None   # within noise only


def three_way(ci_low: float, ci_high: float, null: float = 0.0) -> str:
    """better / worse when the interval excludes ``null``, else within noise."""
    if ci_low > null:
        return BETTER
    if ci_high < null:
        return WORSE
    return WITHIN_NOISE


def paired_verdicts(diffs: np.ndarray, seed: int | np.random.SeedSequence = DEFAULT_SEED,
                    n_bootstrap: int = N_BOOTSTRAP, n_permutations: int = N_PERMUTATIONS) -> list[PairedResult]:
    """:func:`paired_verdict` for each column of ``diffs`` (n samples, metrics), sharing the resamples."""
    d = _columns(diffs)
    if d.ndim != 2 or d.shape[0] < 2:
        raise VerdictError(f"a paired comparison needs at least 2 shared samples, got {d.shape[0] if d.ndim else 0}")
    if not np.all(np.isfinite(d)):
        raise VerdictError("a paired comparison got a missing (NaN) or infinite per-sample score")
    sequence = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    boot_seed, perm_seed = sequence.spawn(2)
    deltas, sds = d.mean(axis=0), d.std(axis=0, ddof=1)
    lows, highs = bootstrap_ci(d, np.random.default_rng(boot_seed), n_bootstrap)
    ps = sign_flip_p(d, np.random.default_rng(perm_seed), n_permutations)
    results = []
    for delta, sd, low, high, p in zip(deltas, sds, lows, highs, ps):
        # the bootstrap of a constant difference is that constant: keep the interval around delta despite float noise
        low, high = min(float(low), float(delta)), max(float(high), float(delta))
        verdict = three_way(low, high)
        needed = samples_needed(float(delta), float(sd)) if verdict == WITHIN_NOISE else None
        results.append(PairedResult(float(delta), low, high, float(p), int(d.shape[0]), float(sd), verdict, needed))
    return results


def paired_verdict(diffs: Sequence[float] | np.ndarray, seed: int | np.random.SeedSequence = DEFAULT_SEED,
                   n_bootstrap: int = N_BOOTSTRAP, n_permutations: int = N_PERMUTATIONS) -> PairedResult:
    """delta, its bootstrap interval, the sign-flip p-value, the verdict and samples_needed for one comparison."""
    d = np.asarray(diffs, dtype=float)
    if d.ndim != 1:
        raise VerdictError(f"paired_verdict takes one array of per-sample differences, got shape {d.shape}")
    return paired_verdicts(d[:, None], seed, n_bootstrap, n_permutations)[0]


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment (controls the family-wise error rate); None / NaN stay None, outside the family."""
    index = [i for i, p in enumerate(p_values) if p is not None and not math.isnan(p)]
    out: list[float | None] = [None] * len(p_values)
    if not index:
        return out
    ps = np.asarray([p_values[i] for i in index], dtype=float)
    order = np.argsort(ps, kind="stable")
    m = ps.size
    stepped = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * ps[order]))
    for rank, position in enumerate(order):
        out[index[position]] = float(stepped[rank])
    return out


# ------------------------------------------------------------------------------------------ the table
@dataclass
class VerdictRow:
    metric: str
    setting: str
    baseline: str
    delta: float
    ci_low: float
    ci_high: float
    p_value: float
    p_adjusted: float
    n_samples: int
    n_seeds: int
    verdict: str
    samples_needed: int | None
    evaluated_at: str | None = None  # eval.at_lengths: the lengths option both were evaluated at (None: their own)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class VerdictTable:
    baseline: str
    rows: list[VerdictRow] = field(default_factory=list)
    baseline_seeds: int = 1

    def to_json(self) -> dict:
        """verdicts.json: ``{"baseline": name, "rows": [{metric, setting, baseline, delta, ...}]}``."""
        return {"baseline": self.baseline, "rows": [row.as_dict() for row in self.rows]}

    def settings(self) -> list[str]:
        return list(dict.fromkeys(row.setting for row in self.rows))

    def sentences(self) -> list[str]:
        """One plain sentence per setting: 'src=1024 vs src=512: ROUGE-L +23.5 [17.1, 29.8], better; ...'."""
        return [setting_sentence([r for r in self.rows if r.setting == s]) for s in self.settings()]

    def metrics(self) -> dict[str, float]:
        """MLflow metrics: ``verdict/<setting>/<metric>/delta|ci_low|ci_high|p``, evaluated at another length
        ``verdict/<setting>/<lengths>/<metric>/...`` (names sanitised for MLflow)."""
        out = {}
        for row in self.rows:
            at = f"{metric_key_part(row.evaluated_at)}/" if row.evaluated_at else ""
            prefix = f"verdict/{metric_key_part(row.setting)}/{at}{metric_key_part(row.metric)}"
            out.update({f"{prefix}/delta": row.delta, f"{prefix}/ci_low": row.ci_low,
                        f"{prefix}/ci_high": row.ci_high, f"{prefix}/p": row.p_value})
        return out


def metric_key_part(text: str) -> str:
    """``text`` with the characters MLflow metric names refuse replaced (it allows [A-Za-z0-9_-. /])."""
    return "".join(c if c.isalnum() or c in "_-. " else "_" for c in text).strip() or "_"


SeedScores = Sequence[Mapping[str, float]]  # one {sample_key: score} per seed
AT = " at "  # "ROUGE-L at src512_tgt128": a metric of the evaluation at another length (eval.at_lengths)


def verdict_table(scores: Mapping[str, Mapping[str, SeedScores]], baseline: str | None = None,
                  metrics: Sequence[str] | None = None, seed: int = DEFAULT_SEED,
                  n_bootstrap: int = N_BOOTSTRAP, n_permutations: int = N_PERMUTATIONS) -> VerdictTable:
    """Every non-baseline setting against the baseline on every metric, Holm-adjusted across the whole table.

    ``scores``: setting name -> metric -> one ``{sample_key: score}`` dict per seed (run), settings in sweep
    order. ``baseline``: a setting name (default: the first). ``metrics``: those to compare (default: every
    metric any setting has, in first-seen order); each setting must have per-sample scores for each. A metric
    named ``<metric>{AT}<lengths>`` (:data:`AT`) was scored at another length (eval.at_lengths): its rows get
    ``metric`` and ``evaluated_at`` apart.
    """
    names = list(scores)
    if len(names) < 2:
        raise VerdictError(f"a paired comparison needs at least 2 settings, got {len(names)}")
    if baseline is None:
        baseline = names[0]
    if baseline not in scores:
        raise VerdictError(f"baseline {baseline!r} is not one of the settings: {', '.join(names)}")
    if metrics is None:
        metrics = list(dict.fromkeys(m for name in names for m in scores[name]))
    for name in names:
        for metric in metrics:
            seeds = scores[name].get(metric)
            if not seeds or not any(seeds):
                raise VerdictError(f"setting {name} has no per-sample {metric} scores (its runs' prediction tables "
                                   f"lack them): cannot compare {metric} sample by sample")
    pooled = {name: {metric: pool_seeds(scores[name][metric]) for metric in metrics} for name in names}
    results: list[tuple[str, str, PairedResult, int]] = []
    for name in names:
        if name == baseline:
            continue
        # metrics scored on the same samples (the usual case: all of them) share one set of resamples: the
        # paired bootstrap of a table row, and one matrix product per block instead of one per metric
        groups: dict[tuple[str, ...], list[tuple[str, np.ndarray]]] = {}
        for metric in metrics:
            diffs, keys = paired_differences(pooled[name][metric], pooled[baseline][metric])
            if diffs.size < 2:
                raise VerdictError(f"{name} vs {baseline}: {diffs.size} dev sample(s) scored by both on {metric}; "
                                   "a paired comparison needs at least 2 (do the runs share a dev set?)")
            groups.setdefault(tuple(keys), []).append((metric, diffs))
        by_metric = {}
        for group in groups.values():
            group_seed = comparison_seed(seed, name, baseline, *(metric for metric, _ in group))
            found = paired_verdicts(np.column_stack([diffs for _, diffs in group]), group_seed, n_bootstrap,
                                    n_permutations)
            by_metric.update({metric: result for (metric, _), result in zip(group, found)})
        results += [(name, metric, by_metric[metric], len(scores[name][metric])) for metric in metrics]
    adjusted = holm([r.p_value for _, _, r, _ in results])
    rows = [VerdictRow(metric=metric.partition(AT)[0], setting=name, baseline=baseline, delta=r.delta,
                       ci_low=r.ci_low, ci_high=r.ci_high, p_value=r.p_value, p_adjusted=p_adj,
                       n_samples=r.n_samples, n_seeds=n_seeds, verdict=r.verdict, samples_needed=r.samples_needed,
                       evaluated_at=metric.partition(AT)[2] or None)
            for (name, metric, r, n_seeds), p_adj in zip(results, adjusted)]
    baseline_seeds = max(len(scores[baseline][m]) for m in metrics) if metrics else 1
    return VerdictTable(baseline=baseline, rows=rows, baseline_seeds=baseline_seeds)


# ------------------------------------------------------------------------------------------ sentences
def decimals(*values: float) -> int:
    """Decimals that show the interval with about two significant digits of its width: 1 to 4."""
    width = abs(values[-1] - values[-2]) if len(values) >= 2 else 0.0
    if width <= 0 or not math.isfinite(width):
        return 1
    return int(min(4, max(1, 1 - math.floor(math.log10(width)))))


def delta_decimals(delta: float, ci_low: float, ci_high: float) -> int:
    """The interval's decimals, more where the delta would otherwise print as 0 (+0.03, not +0.0): up to 4."""
    k = decimals(ci_low, ci_high)
    if delta and math.isfinite(delta) and abs(delta) < 10 ** -k:
        k = min(4, -math.floor(math.log10(abs(delta))))
    return k


def about(n: int) -> str:
    """A count rounded to two significant digits for prose: 873 -> '870', 12345 -> '12,000'."""
    if n < 100:
        return str(n)
    digits = math.floor(math.log10(n)) - 1
    return f"{round(n, -digits):,}"


def row_phrase(row: VerdictRow) -> str:
    """'ROUGE-L +23.5 [17.1, 29.8], better' / 'BLEU-4 +0.4 [-1.2, 2.0], within noise: about 900 dev samples ...'."""
    k = decimals(row.ci_low, row.ci_high)
    d = delta_decimals(row.delta, row.ci_low, row.ci_high)
    name = row.metric + (f"{AT}{row.evaluated_at}" if row.evaluated_at else "")
    text = f"{name} {row.delta:+.{d}f} [{row.ci_low:.{k}f}, {row.ci_high:.{k}f}], {row.verdict}"
    if row.verdict == WITHIN_NOISE:
        if row.samples_needed is None:
            text += ": no difference observed"
        else:
            text += f": about {about(row.samples_needed)} dev samples would detect {row.delta:+.{d}f}"
    return text


def setting_sentence(rows: Sequence[VerdictRow]) -> str:
    if not rows:
        return ""
    return f"{rows[0].setting} vs {rows[0].baseline}: " + "; ".join(row_phrase(r) for r in rows)
