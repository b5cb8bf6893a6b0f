"""Empirical privacy audit: a LOWER bound on epsilon, measured on the code a run executes.

Every epsilon the library prints is an upper bound derived from the mechanism we believe the code
runs. The audit plays a distinguishing game through the real round (audit_round.AuditRound: the
round's keys, mechanism, aggregator and chunking; for DP-SGD, `client.dpsgd_grads` with the keys a
run derives), thousands of trials in one jit, each with its own 64-bit noise root, and turns the
canary scores into a lower bound that holds with the stated confidence. Beside the lower bound,
detectors that a lower bound cannot replace: the shape of a Gaussian game's scores, the noise of
the real round (its variance in every round, empty ones included, and its independence across
rounds, clients and chunks) and the root's entropy (audit_round). The verdict is VIOLATION when
any fires at VERDICT_CONFIDENCE, family-wise.

One game per DP mode (registry GAMES, keyed by the mechanism's name):
- local: a canary client whose clipped release is a chosen direction at the clip norm in every
  clipped block, against its neighbour (replace-one: the opposite canary; add-remove: a zero
  update), alone in its cohort for P rounds of the real round (fresh round keys each).
- central: a canary client Poisson-sampled at rate q among the federation's other clients, T rounds
  of the real round (clip, chunked sums, the noise in every round, empty cohorts included).
- dpsgd: a canary record (its gradient, of norm above the clip, is the canary) in one client's data,
  Poisson-sampled at the client's batch rate at every local step, through `client.dpsgd_grads` with
  the mechanism's `dpsgd_args`; local_steps x P steps.

Scores are projections of what the observer sees on the canary direction, normalised by the
noise (for a sampled game, the per-round likelihood-ratio statistic of the subsampled Gaussian,
summed). jax-privacy's CanaryScoreAuditor turns them into a distribution-free bound (Clopper-Pearson
over all thresholds, Bonferroni) and the attack's TPR at low FPR. Where the game is a plain Gaussian
mechanism (local; central and dpsgd with sampling rate 1) the scores are Gaussian with equal
variance by construction: checked by normality and equal-variance tests, the standardised mean
difference mu then has an exact lower confidence limit (noncentral t), and Gaussian DP with that
mu converts to (epsilon, delta) with dp-accounting: the GDP bound. Each bound is computed at
confidence 1 - (1 - c)/2, so their maximum, `epsilon_lower`, holds at confidence c.

The canaries are built in audit_canary.py, the games are in audit_games.py, the round harness and
the noise and root checks in audit_round.py, the bounds in audit_bounds.py; this module builds a
game for a config, plays it, runs the detectors and reports.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from ...core.errors import UserError
from ...core.pytypes import Array
from ...federated import sampling
from .. import mechanisms as modes
from . import correlated  # noqa: F401  (registers the bandmf game)
from .bounds import LOW_FPRS, NORMALITY_ALPHA, SHAPE_TESTS, bounds, gdp_bound  # noqa: F401  (re-exported)
from .canary import _TRIALS, OVERSHOOT, adapter_shapes  # noqa: F401  (re-exported)
from .games import (  # noqa: F401  (re-exported)
    CHUNK_BYTES,
    GAMES,
    CentralGame,
    DPSGDGame,
    Game,
    LocalGame,
    register,
)
from .round import _ROOTS, noise_check, root_check, trial_roots

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ...config.run_config import RunConfig
    from ..mechanisms import Mechanism

MIN_TRIALS = 100
VERDICT_CONFIDENCE = 0.9999  # family-wise: a correct mechanism reads VIOLATION at most 1 audit in 10,000


# ----------------------------------------------------------------------------- driver


def build_game(
    cfg: RunConfig,
    *,
    compositions: int | None = None,
    seed: int | None = None,
    mechanism: Mechanism | None = None,
    client_sizes: Sequence[int] | np.ndarray | None = None,
    others: str = "zero",
) -> Game:
    """The game of cfg.dp.mode, on the run's adapter shapes and calibrated mechanism.
    mechanism: a mechanism object to audit instead of modes.build's (e.g. a deliberately broken one).
    compositions: participations (local, dpsgd) or rounds (central, bandmf); default: the run's."""
    mode = cfg.dp.mode if mechanism is None else mechanism.name
    if mode not in modes.MECHANISMS:
        raise UserError(f"dp.mode = {mode!r} is not allowed; choose one of: {', '.join(modes.dp_names())}")
    if not modes.MECHANISMS[mode].private:
        raise UserError(
            f"dp.mode = {mode!r} runs no DP mechanism, so there is nothing to audit; "
            f"set dp.mode to one of: {', '.join(modes.dp_names())}"
        )
    if mode not in GAMES:
        raise UserError(f"dp.mode = {mode!r} has no audit game; audited modes: {', '.join(GAMES)}")
    shapes = adapter_shapes(cfg)
    if mechanism is None:
        if mode == "dpsgd" and client_sizes is None:
            client_sizes = _client_sizes(cfg)
        with warnings.catch_warnings():  # the audit reports the classical formula's figure itself
            warnings.simplefilter("ignore")
            mechanism = modes.build(cfg, shapes, client_sizes)
    if not mechanism.z > 0:
        raise UserError(
            f"dp.noise_multiplier = {mechanism.z:g} adds no noise: epsilon is infinite and there is no "
            f"bound to check; give a positive noise multiplier"
        )
    if compositions is None:
        summed = modes.MECHANISMS[mode].sums_updates  # central, bandmf: the rounds (noise in each)
        compositions = cfg.fl.rounds if summed else int(sampling.config_counts(cfg).max())
    if compositions < 1:
        raise UserError(f"compositions must be >= 1, got {compositions}")
    game = GAMES[mode](
        mechanism, shapes, int(compositions), cfg.seed if seed is None else int(seed), others, client_sizes
    )
    game.setup()
    return game


def _client_sizes(cfg):
    from ...data.pipeline import prepare
    from ...models.factory import build_tokenizer

    return [len(p) for p in prepare(cfg, build_tokenizer(cfg)).parts]


def play(
    game: Game, trials: int, chunk: int | None = None, seed: int | None = None
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(in scores, out scores, seconds to compile, seconds to run): trials // 2 games with the canary
    in and the rest without, in one jit (lax.map over chunks of vmapped trials), each trial with its
    own 64-bit noise root (audit_round.trial_roots of `seed`, default the game's). The roots are an
    argument of the compiled function: another seed compiles nothing."""
    n_in, n_out = trials // 2, trials - trials // 2
    limit = chunk or max(1, CHUNK_BYTES // max(game.per_trial_bytes, 1))
    n_chunks = -(-trials // limit)
    chunk = -(-trials // n_chunks)
    pad = n_chunks * chunk - trials  # extra out-world trials, discarded: no remainder to compile twice
    worlds = jnp.concatenate([jnp.ones(n_in, jnp.int32), jnp.zeros(n_out + pad, jnp.int32)])
    words = jnp.asarray(trial_roots(game.seed if seed is None else int(seed), _ROOTS, n_in + n_out + pad))

    def run(words: Array, worlds: Array) -> Array:
        return jax.lax.map(lambda x: game.trial(*x), (words, worlds), batch_size=chunk)

    cache = game.__dict__.setdefault("_compiled", {})
    t0 = time.perf_counter()
    if (trials, chunk) not in cache:
        cache[(trials, chunk)] = jax.jit(run).lower(words, worlds).compile()
    compiled = cache[(trials, chunk)]
    t1 = time.perf_counter()
    scores = np.asarray(jax.block_until_ready(compiled(words, worlds)), np.float64)[:trials]
    t2 = time.perf_counter()
    if not np.all(np.isfinite(scores)):
        raise UserError("the audit's scores are not finite (the release overflowed); lower the clip norms")
    return scores[:n_in], scores[n_in:], t1 - t0, t2 - t1


def audit(
    cfg: RunConfig,
    trials: int = 4000,
    *,
    confidence: float = 0.95,
    compositions: int | None = None,
    seed: int | None = None,
    mechanism: Mechanism | None = None,
    client_sizes: Sequence[int] | np.ndarray | None = None,
    others: str = "zero",
    chunk: int | None = None,
    game: Game | None = None,
    verdict_confidence: float = VERDICT_CONFIDENCE,
) -> dict:
    """Play the game of the config's DP mode through the real round, run the noise and root checks,
    and report the empirical lower bound beside the accountant's epsilon for exactly that game (and,
    in local mode, the paper's figure). game: an already built game (another seed then compiles
    nothing). The verdict is VIOLATION when a detector fires at verdict_confidence (family-wise)."""
    if not isinstance(trials, (int, np.integer)) or trials < MIN_TRIALS:
        raise UserError(f"trials = {trials} is too few for a confidence bound; give at least {MIN_TRIALS}")
    for name, c in (("confidence", confidence), ("verdict_confidence", verdict_confidence)):
        if not 0.5 < c < 1:
            raise UserError(f"{name} must be in (0.5, 1), got {c}")
    if game is None:
        game = build_game(
            cfg, compositions=compositions, seed=seed, mechanism=mechanism, client_sizes=client_sizes, others=others
        )
    m = game.mech
    delta = m.cfg.dp.delta
    s_in, s_out, t_compile, t_run = play(game, int(trials), chunk, seed)
    out = {
        "mode": game.mode,
        "trials": int(trials),
        "compositions": game.compositions,
        "game": game.description,
        "noise_multiplier": m.z,
        "effective_noise_multiplier": m.z_eff,
        "neighbouring": m.neighbouring,
        "delta": delta,
        "confidence": confidence,
        "verdict_confidence": verdict_confidence,
        "seed": game.seed if seed is None else int(seed),
    }
    out.update(bounds(s_in, s_out, delta, confidence, game.gaussian))
    out["mu_expected"] = game.mu_expected
    out["epsilon_accountant"] = game.accountant_epsilon()
    per_release, tracker = game.paper_epsilon()
    out["epsilon_paper"] = tracker
    out["epsilon_paper_per_release"] = per_release
    out["detectors"] = detectors(game, s_in, s_out, out["epsilon_accountant"], verdict_confidence, seed)
    fired = [k for k, d in out["detectors"].items() if d.get("fired")]
    out["detected_by"] = fired
    out["consistent"] = not fired
    out["paper_falsified"] = None if tracker is None else bool(out["epsilon_lower"] > tracker)
    out["trials_needed"] = trials_needed(out, confidence)
    out["seconds_compile"], out["seconds_run"] = t_compile, t_run
    out["trials_per_second"] = trials / t_run if t_run > 0 else None
    out["verdict"] = verdict(out)
    return out


def detectors(
    game: Game, s_in: np.ndarray, s_out: np.ndarray, eps_acc: float, verdict_confidence: float, seed: int | None
) -> dict:
    """Each detector with its evidence and whether it fired. The verdict's level 1 - verdict_confidence
    is split evenly (Bonferroni) over the statistical ones: lower bound, shape, noise."""
    alpha = (1 - verdict_confidence) / 3
    delta = game.mech.cfg.dp.delta
    strict = bounds(s_in, s_out, delta, 1 - alpha, game.gaussian)
    out = {
        "lower_bound": {
            "epsilon_lower": strict["epsilon_lower"],
            "confidence": 1 - alpha,
            "fired": bool(strict["epsilon_lower"] > eps_acc),
        }
    }
    if game.gaussian:
        gdp = strict["gdp"]
        ps = {k: gdp[k] for k in SHAPE_TESTS}
        # three tests inside this detector's share of the level
        out["shape"] = {**ps, "level": alpha / 3, "fired": bool(min(ps.values()) < alpha / 3)}
    noise = noise_check(game.mech, game.shapes, seed=game.seed if seed is None else int(seed))
    noise["fired"] = bool(noise["applicable"] and not noise["passed"])
    out["noise"] = noise
    root = root_check(noise)
    root["fired"] = not root["passed"]
    out["root"] = root
    return out


def trials_needed(r: dict, confidence: float, fractions: Sequence[float] = (0.5, 0.9)) -> dict:
    """For a Gaussian game: the trials at which the GDP lower bound (at `confidence`) is expected to
    reach each fraction of the accountant's epsilon, if the scores separate as measured (mu_hat).
    None where the measured separation cannot reach it; sampled games: distribution-free bounds
    need about e^epsilon trials (one in-world trial above every out-world one)."""
    import dp_accounting as dpa
    from scipy import optimize, stats

    mu = (r.get("gdp") or {}).get("mu_hat")
    if not r["gdp"]["applicable"] or mu is None or not math.isfinite(mu):
        return {"gdp": None, "distribution_free": "about e^epsilon trials"}
    z = stats.norm.isf((1 - confidence) / 2)
    out = {}
    for f in fractions:
        target = f * r["epsilon_accountant"]
        mu_f = optimize.brentq(lambda m: dpa.get_epsilon_gaussian(1 / m, r["delta"]) - target, 1e-6, 1e3)
        out[f"{f:g}"] = None if mu <= mu_f else int(math.ceil(z * z * (4 + mu * mu / 2) / (mu - mu_f) ** 2))
    return {"gdp": out, "distribution_free": "about e^epsilon trials"}


def verdict(r: dict) -> str:
    """One line: consistent, or VIOLATION naming the detectors that fired and their evidence."""
    if r["consistent"]:
        line = (
            f"consistent: no detector fired at {r['verdict_confidence']:.4g} family-wise confidence (lower bound "
            f"{r['epsilon_lower']:.4g} at {r['confidence']:.4g} confidence vs the accountant's "
            f"{r['epsilon_accountant']:.4g}; score shape, round noise and root entropy checked)"
        )
    else:
        d, why = r["detectors"], []
        if d["lower_bound"]["fired"]:
            why.append(
                f"the lower bound {d['lower_bound']['epsilon_lower']:.4g} at {d['lower_bound']['confidence']:.6g} "
                f"confidence exceeds the accountant's {r['epsilon_accountant']:.4g}"
            )
        if d.get("shape", {}).get("fired"):
            why.append("the scores of a plain Gaussian mechanism are not Gaussian with equal variance")
        why += d["noise"].get("failures", []) if d["noise"].get("fired") else []
        why += d["root"]["failures"]
        line = (
            "VIOLATION: " + "; ".join(why) + f" (detectors: {', '.join(r['detected_by'])}; a correct mechanism "
            f"reads this with probability at most {1 - r['verdict_confidence']:.2g}): the code does not run "
            f"the mechanism the accountant assumes"
        )
    if r.get("paper_falsified"):
        line += f"; the paper's figure {r['epsilon_paper']:.4g} is falsified"
    return line
