"""Human A/B votes: the Wilson interval of a win rate, a two-sided sign (exact binomial) test over the decisive
votes, and the three-way verdict compare's paired comparison uses (better / worse when the interval excludes
50 %, else within noise), read as 'A preferred 14 of 20 decisive votes, 70 % [48, 85], p = 0.12, within noise'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats

from glm_experiments.study.verdicts import (
    BETTER,
    WITHIN_NOISE,
    WORSE,
    VerdictError,
    three_way,
)

Z95 = 1.959963984540054  # two-sided 95 %


def wilson_interval(wins: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``wins / trials`` (``(0, 1)`` when there are no trials)."""
    if trials <= 0:
        return 0.0, 1.0
    p = wins / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class VoteVerdict:
    """A/B votes: a's win rate over decisive votes, its Wilson interval, the sign test, the verdict for a."""

    wins_a: int
    wins_b: int
    win_rate_a: float | None
    ci_low: float
    ci_high: float
    p_value: float | None
    verdict: str  # for a against b: better / worse when the interval excludes 50 %, else within noise

    @property
    def decisive(self) -> int:
        return self.wins_a + self.wins_b

    def sentence(self, label_a: str = "A", label_b: str = "B") -> str:
        """'A preferred 14 of 20 decisive votes, 70 % [48, 85], p = 0.12, within noise' (from the side with more wins)."""
        if not self.decisive:
            return f"no decisive votes between {label_a} and {label_b}"
        if self.wins_b > self.wins_a:
            label, wins, low, high = label_b, self.wins_b, 1 - self.ci_high, 1 - self.ci_low
            verdict = {BETTER: WORSE, WORSE: BETTER}.get(self.verdict, self.verdict)
        else:
            label, wins, low, high, verdict = label_a, self.wins_a, self.ci_low, self.ci_high, self.verdict
        return (f"{label} preferred {wins} of {self.decisive} decisive votes, {100 * wins / self.decisive:.0f} % "
                f"[{100 * low:.0f}, {100 * high:.0f}], p {format_p(self.p_value)}, {verdict}")


def format_p(p: float | None) -> str:
    """'= 0.12', '= 0.004', '< 0.001' (to follow a 'p')."""
    if p is None:
        return "n/a"
    if p < 0.001:
        return "< 0.001"
    return f"= {p:.3f}" if p < 0.01 else f"= {p:.2f}"


def vote_verdict(wins_a: int, wins_b: int, interval: tuple[float, float] | None = None) -> VoteVerdict:
    """The sign test (two-sided exact binomial, p = 1/2) over the decisive votes beside the Wilson interval.

    Ties and "both bad" say neither is better and are not votes here. ``interval``: a's interval when the caller
    already has one (human_eval's Wilson interval), else computed here.
    """
    if wins_a < 0 or wins_b < 0:
        raise VerdictError(f"vote counts cannot be negative: {wins_a}, {wins_b}")
    decisive = wins_a + wins_b
    if not decisive:
        return VoteVerdict(wins_a, wins_b, None, 0.0, 1.0, None, WITHIN_NOISE)
    low, high = interval if interval is not None else wilson_interval(wins_a, decisive)
    p = float(stats.binomtest(wins_a, decisive, 0.5, alternative="two-sided").pvalue)
    return VoteVerdict(wins_a, wins_b, wins_a / decisive, low, high, p, three_way(low, high, null=0.5))
