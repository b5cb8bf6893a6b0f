"""The audit's lower bounds on epsilon from canary scores: distribution-free (jax-privacy's
CanaryScoreAuditor) and, for Gaussian games, the Gaussian-DP bound (see audit.py)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from ...core.errors import UserError

if TYPE_CHECKING:
    from collections.abc import Sequence

LOW_FPRS = (1e-3, 1e-2)  # where the attack's TPR is reported
SHAPE_TESTS = ("normality_p_in", "normality_p_out", "equal_variance_p")  # the p-values of a Gaussian game's shape
NORMALITY_ALPHA = 1e-3  # a Gaussian game whose scores fail a test at this level gets no GDP bound


def gdp_bound(
    in_scores: np.ndarray | Sequence[float], out_scores: np.ndarray | Sequence[float], delta: float, confidence: float
) -> dict:
    """The Gaussian-DP lower bound from scores that are Gaussian with equal variance (checked):
    a one-sided lower confidence limit on mu = (mean_in - mean_out) / sd (exact, noncentral t),
    converted to (epsilon, delta) with dp-accounting (Gaussian mechanism of multiplier 1/mu)."""
    import dp_accounting as dpa
    from scipy import optimize, stats

    x, y = np.asarray(in_scores, np.float64), np.asarray(out_scores, np.float64)
    n1, n2 = x.size, y.size
    out = {
        "normality_p_in": float(stats.normaltest(x).pvalue),
        "normality_p_out": float(stats.normaltest(y).pvalue),
        "equal_variance_p": float(stats.bartlett(x, y).pvalue),
    }
    sd = math.sqrt(((n1 - 1) * x.var(ddof=1) + (n2 - 1) * y.var(ddof=1)) / (n1 + n2 - 2))
    d = (x.mean() - y.mean()) / sd if sd > 0 else math.inf
    out["mu_hat"] = float(d)
    alpha = 1 - confidence
    f = math.sqrt(n1 * n2 / (n1 + n2))
    df = n1 + n2 - 2
    if not math.isfinite(d):
        mu_lo = math.inf
    else:
        t = d * f
        target = lambda nc: stats.nct.sf(t, df, nc) - alpha
        se = math.sqrt(1 / n1 + 1 / n2 + d * d / (2 * df))
        lo, hi = t - 10 * f * se - 10, t
        try:
            mu_lo = optimize.brentq(target, lo, hi) / f
        except (ValueError, RuntimeError):  # out of the bracket numerically: the normal approximation
            mu_lo = d - stats.norm.isf(alpha) * se
    out["mu_lower"] = float(mu_lo)
    if mu_lo <= 0:
        out["epsilon"] = 0.0
    elif not math.isfinite(mu_lo):
        out["epsilon"] = math.inf
    else:
        out["epsilon"] = float(dpa.get_epsilon_gaussian(1.0 / mu_lo, delta))
    return out


def bounds(
    in_scores: np.ndarray | Sequence[float],
    out_scores: np.ndarray | Sequence[float],
    delta: float,
    confidence: float = 0.95,
    gaussian: bool = False,
) -> dict:
    """Both lower bounds from in/out canary scores (higher score: canary in), each at confidence
    1 - (1 - confidence)/2 so that their maximum holds at `confidence`; TPR at low FPR; AUROC."""
    from jax_privacy.auditing import CanaryScoreAuditor

    if not 0.5 < confidence < 1:
        raise UserError(f"confidence must be in (0.5, 1), got {confidence}")
    alpha_each = (1 - confidence) / 2
    auditor = CanaryScoreAuditor(np.asarray(in_scores, np.float64), np.asarray(out_scores, np.float64))
    eps_df = float(auditor.epsilon_clopper_pearson(alpha_each, delta, one_sided=False))
    out = {
        "epsilon_lower_distribution_free": eps_df,
        "tpr_at_fpr": {f"{f:g}": float(auditor.tpr_at_given_fpr(f)) for f in LOW_FPRS},
        "auroc": float(auditor.attack_auroc()),
    }
    gdp = {"applicable": bool(gaussian)}
    eps_gdp = None
    if gaussian:
        gdp.update(gdp_bound(in_scores, out_scores, delta, 1 - alpha_each))
        failed = [k for k in SHAPE_TESTS if gdp[k] < NORMALITY_ALPHA]
        if failed:
            gdp["applicable"] = False
            gdp["reason"] = f"the scores fail {', '.join(failed)} < {NORMALITY_ALPHA:g}: not reported"
        else:
            eps_gdp = gdp["epsilon"]
    else:
        gdp["reason"] = (
            "the game samples (q < 1): its scores are a Gaussian mixture, so only the distribution-free bound applies"
        )
    out["epsilon_lower_gdp"] = eps_gdp
    out["gdp"] = gdp
    out["epsilon_lower"] = max(eps_df, eps_gdp or 0.0)
    return out
