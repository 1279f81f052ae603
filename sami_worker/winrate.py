"""Win rates from pairwise judge verdicts, with 95% intervals (docs/method.md, 'Evaluation and
win rates').

Pure statistics on per-item outcomes y in [0, 1]: 1 the tested model won, 0 it lost, 0.5 a tie
or an unparsable verdict; with both A/B orders judged, the mean of the two (so 0.25 and 0.75
occur too).

- Raw win rate: the mean outcome, with the Wilson score interval for sum(y) wins in n items.
  Ties are Bernoulli(0.5) to Wilson, which overstates their variance (a tie is a sure 0.5):
  the interval errs wide, never narrow.
- Length-corrected win rate: LLM judges favour longer answers, so, as in the paper, fit
  P(win) = sigmoid(b0 + b1 * z) with z = (len_test - len_base) / sd (the sample sd of the
  differences) and report sigmoid(b0), the win rate at equal length. The fit is statsmodels'
  GLM (Binomial, logit); fractional outcomes are its quasi-likelihood, whose score equations
  are those of splitting a tie into half a win and half a loss. Its model-based variance
  p(1 - p) bounds that of any outcome in [0, 1] with mean p, so the interval is conservative.
  The 95% interval is the Wald interval of b0 mapped through the sigmoid (it stays in [0, 1]).

A judge that always prefers the longer answer separates the data perfectly (all wins at z > 0,
all losses at z < 0) and the maximum-likelihood slope is infinite. A weak log-F(1,1) prior on
b1 (Greenland & Mansournia 2015, "Penalization, bias reduction, and default priors in logistic
regression"), added as one pseudo-observation with outcome 0.5 and covariates (0, 1), keeps it
finite; at hundreds of items it moves ordinary estimates by a fraction of their standard error.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

Z95 = 1.959963984540054  # standard normal 97.5% quantile


@dataclass(frozen=True)
class Interval:
    """A point estimate with its 95% interval."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class WinRateEstimate:
    """Raw and length-corrected win rates of one model against one baseline."""

    raw: Interval
    length_corrected: Interval | None  # None when the length effect cannot be estimated
    items: int


def wilson_interval(wins: float, n: int) -> Interval:
    """Mean wins/n with its 95% Wilson score interval; `wins` may be fractional (ties)."""
    if n <= 0:
        raise ValueError(f"n must be positive; got {n}")
    if not 0 <= wins <= n:
        raise ValueError(f"wins must lie in [0, n={n}]; got {wins}")
    from statsmodels.stats.proportion import proportion_confint

    low, high = proportion_confint(wins, n, alpha=0.05, method="wilson")
    return Interval(wins / n, max(0.0, float(low)), min(1.0, float(high)))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def length_corrected_rate(outcomes: Sequence[float], length_diffs: Sequence[float]) -> Interval:
    """sigmoid(b0) of P(win) = sigmoid(b0 + b1 * diff / sd(diff)), with its 95% interval.

    outcomes[i] in [0, 1] and length_diffs[i] = len_test - len_base of item i. Raises
    ValueError when the length effect cannot be estimated (all differences equal but not
    zero, or the fit does not converge).
    """
    y = np.asarray(outcomes, dtype=np.float64)
    diffs = np.asarray(length_diffs, dtype=np.float64)
    if y.shape != diffs.shape or y.ndim != 1 or len(y) < 2:
        raise ValueError(
            f"need two or more items with one length difference each; got {y.shape} outcomes "
            f"and {diffs.shape} differences"
        )
    sd = float(diffs.std(ddof=1))
    if sd == 0:
        raise ValueError(f"every length difference is {diffs[0]:g}: no spread to regress on")

    import statsmodels.api as sm
    from statsmodels.tools.sm_exceptions import ConvergenceWarning, PerfectSeparationWarning

    design = np.column_stack([np.ones_like(diffs), diffs / sd])
    # The log-F(1,1) prior on b1 (module docstring): outcome 0.5 at intercept 0, z = 1.
    design = np.vstack([design, [0.0, 1.0]])
    y = np.append(y, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerfectSeparationWarning)
        warnings.simplefilter("error", ConvergenceWarning)
        try:
            fit = sm.GLM(y, design, family=sm.families.Binomial()).fit()
        except (PerfectSeparationWarning, ConvergenceWarning) as err:
            raise ValueError(f"the length-corrected fit failed: {err}") from None
    b0, se = float(fit.params[0]), float(fit.bse[0])
    if not (fit.converged and math.isfinite(b0) and math.isfinite(se)):
        raise ValueError("the length-corrected fit did not converge")
    return Interval(_sigmoid(b0), _sigmoid(b0 - Z95 * se), _sigmoid(b0 + Z95 * se))


def compute_win_rate(
    outcomes: Sequence[float], test_lengths: Sequence[float], base_lengths: Sequence[float]
) -> WinRateEstimate:
    """Raw and length-corrected win rates from per-item outcomes and response lengths."""
    n = len(outcomes)
    if n == 0:
        raise ValueError("no judged items")
    if not len(test_lengths) == len(base_lengths) == n:
        raise ValueError(
            f"one length per item: {n} outcomes, {len(test_lengths)} test lengths, "
            f"{len(base_lengths)} baseline lengths"
        )
    if any(not 0 <= y <= 1 for y in outcomes):
        raise ValueError("outcomes must lie in [0, 1]")
    raw = wilson_interval(float(sum(outcomes)), n)
    diffs = [t - b for t, b in zip(test_lengths, base_lengths, strict=True)]
    corrected: Interval | None
    if len(set(outcomes)) == 1 or all(d == 0 for d in diffs):
        # Nothing for length to explain (every verdict the same), or every pair already has
        # equal length: the raw rate is the rate at equal length.
        corrected = raw
    else:
        try:
            corrected = length_corrected_rate(outcomes, diffs)
        except ValueError as err:
            log.warning("no length-corrected win rate: %s", err)
            corrected = None
    return WinRateEstimate(raw=raw, length_corrected=corrected, items=n)
