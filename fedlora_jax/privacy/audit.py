"""Empirical privacy audit: a LOWER bound on epsilon, measured on the code a run executes.

Every epsilon the library prints is an upper bound derived from the mechanism we believe the code
runs. The audit plays a distinguishing game against the run's own jitted release path (the
mechanism object of `privacy.modes` and, for DP-SGD, `client.dpsgd_grads`), thousands of trials in
one jit, and turns the canary scores into a lower bound that holds with the stated confidence. If
the lower bound ever exceeds the accountant's figure for the same game, the accountant does not
describe the code (a hole, e.g. a round that skips the noise).

One game per DP mode (registry GAMES, keyed by the mechanism's name):
- local: a canary client whose clipped release is a chosen direction at the clip norm in every
  clipped block, against its neighbour (replace-one: the opposite canary; add-remove: a zero
  update), through `mechanism.release`, composed over P participations (fresh noise each).
- central: a canary client Poisson-sampled at rate q among the federation's other clients, every
  client through `mechanism.release` (clip), the kept releases summed as the round sums them, and
  `mechanism.finalize_sum` (noise) in every round, empty cohorts included; T rounds.
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
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from .. import lora as lora_lib
from .. import randomness, sampling
from ..errors import UserError
from . import accounting as acc
from . import mechanisms as prim
from . import modes

MIN_TRIALS = 100
OVERSHOOT = 10.0  # canary inputs are this many clip norms long: the release must clip them
LOW_FPRS = (1e-3, 1e-2)  # where the attack's TPR is reported
NORMALITY_ALPHA = 1e-3  # a Gaussian game whose scores fail a test at this level gets no GDP bound
CHUNK_BYTES = 256 * 2**20  # memory of one vmapped chunk of trials (lax.map batch)

# sub-streams of the "audit" randomness domain: key(seed, "audit", STREAM, ...)
_CANARY, _TRIALS, _OTHERS = 0, 1, 2

GAMES: dict[str, type[Game]] = {}


def register(cls):
    GAMES[cls.mode] = cls
    return cls


# ----------------------------------------------------------------------------- helpers


def _tree_vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _is_a_leaf(path) -> bool:
    return getattr(path[-1], "key", None) == "lora_a"


def _per_leaf_sigma(tree, sigma_a, sigma_b):
    """A tree of the noise standard deviation of each leaf (A: sigma_a, B: sigma_b)."""
    return jax.tree_util.tree_map_with_path(lambda p, x: sigma_a if _is_a_leaf(p) else sigma_b, tree)


def _weights(delta_tree, sigma_a, sigma_b):
    """(w, mu): the linear likelihood-ratio statistic <y, w> of a Gaussian with per-leaf noise sigma
    and mean shift delta_tree, normalised to unit variance, and its mean shift mu = ||delta/sigma||."""

    def f(d):
        sig = _per_leaf_sigma(d, max(sigma_a, 1e-30), max(sigma_b, 1e-30))
        mu = jnp.sqrt(sum(jnp.sum(jnp.square(x / s)) for x, s in zip(jax.tree.leaves(d), jax.tree.leaves(sig))))
        return jax.tree.map(lambda x, s: x / (s * s) / jnp.maximum(mu, 1e-30), d, sig), mu

    w, mu = jax.jit(f)(delta_tree)
    mu = float(mu)
    if not mu > 0:
        raise UserError(
            "the audit canary has no component the mechanism releases (every clipped block is empty); nothing to audit"
        )
    return w, mu


def _sampled_llr(s, mu, q):
    """Log likelihood ratio of one subsampled-Gaussian observation with unit-variance score s:
    log((1 - q) + q exp(mu s - mu^2/2)); for q = 1 it is affine in s."""
    log_keep = jnp.log1p(-q) if q < 1 else -jnp.inf
    return jnp.logaddexp(log_keep, math.log(q) + mu * s - 0.5 * mu * mu)


def _mech_state(mech) -> dict:
    """The mechanism's own server state at the start of a run (e.g. an adaptive clip; {} for most)."""
    return mech.init_state()


def _random_tree(key, shapes):
    leaves, treedef = jax.tree.flatten(shapes)
    return jax.tree.unflatten(
        treedef, [jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32) for i, x in enumerate(leaves)]
    )


def adapter_shapes(cfg):
    """The run's adapter as shapes (ShapeDtypeStruct leaves), without loading any weights."""
    from ..models import abstract_model
    from ..models.factory import build_model_config

    lc = cfg.lora.to_lora_config()
    mc = build_model_config(cfg)
    lc.check(mc)
    return abstract_model(mc, lc)[2]


def _zeros(shapes):
    return jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), shapes)


def _canary_direction(mech, shapes, seed, zero_a=False):
    """A random direction whose every separately clipped block lies exactly at its clip norm (the
    release's own clip applied to a far longer random vector)."""

    def f(key):
        r = _random_tree(key, shapes)
        if zero_a:
            r = lora_lib.map_modules(lambda a, b: (jnp.zeros_like(a), b), r)
        return _canary_like(mech, r)

    return jax.jit(f)(randomness.key(seed, "audit", _CANARY, 0))


def _canary_like(mech, r):
    """r rescaled so that each separately clipped block of the release lies at its clip norm."""
    dp = mech.cfg.dp
    clip_b = dp.clip_a if dp.scope == "global" else dp.clip_b
    return prim.clip(jax.tree.map(lambda x: x * 1e6, r), dp.clip_a, clip_b, dp.scope)[0]


# ----------------------------------------------------------------------------- games


@dataclasses.dataclass
class Game:
    """A distinguishing game: `trial(key, world)` -> one score (world 1: canary in, 0: out), jittable
    and vmappable; plus the accountant's epsilon for exactly this game."""

    mode: ClassVar[str] = ""
    mech: Any
    shapes: Any
    compositions: int
    seed: int
    others: str = "zero"
    client_sizes: Any = None

    gaussian: bool = dataclasses.field(default=False, init=False)  # scores Gaussian by construction
    mu_expected: float | None = dataclasses.field(default=None, init=False)
    description: str = dataclasses.field(default="", init=False)
    per_trial_bytes: int = dataclasses.field(default=0, init=False)

    def setup(self) -> None:
        raise NotImplementedError

    def trial(self, key, world):
        raise NotImplementedError

    def accountant_epsilon(self) -> float:
        raise NotImplementedError

    def paper_epsilon(self) -> tuple[float | None, float | None]:
        return None, None

    def _adapter_bytes(self) -> int:
        return sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(self.shapes))


@register
class LocalGame(Game):
    """Local DP: the canary client's P releases, each through mechanism.release with fresh noise."""

    mode: ClassVar[str] = "local"

    def setup(self):
        m, dp = self.mech, self.mech.cfg.dp
        self.g = _zeros(self.shapes)
        c = _canary_direction(m, self.shapes, self.seed, zero_a=m.cfg.lora.freeze_a)
        self.x_in = jax.tree.map(lambda x: OVERSHOOT * x, c)
        if dp.neighbouring == "replace-one":  # the neighbour releases the opposite canary
            self.x_out = jax.tree.map(lambda x: -x, self.x_in)
            delta = jax.tree.map(lambda x: 2 * x, c)
        else:  # add-remove: the neighbour's update is zero
            self.x_out = _zeros(self.shapes)
            delta = c
        self.w, self.mu_release = _weights(delta, m.sigma_a, m.sigma_b)
        self.gaussian = True
        self.mu_expected = self.mu_release * math.sqrt(self.compositions)
        self.per_trial_bytes = 6 * self._adapter_bytes()
        self.description = (
            f"local: canary client at the clip norm in each of {sum(m.blocks)} clipped block(s) vs "
            f"{'the opposite canary' if dp.neighbouring == 'replace-one' else 'a zero update'} "
            f"({dp.neighbouring}), {self.compositions} release(s) through mechanism.release"
        )

    def trial(self, key, world):
        m, g, w = self.mech, self.g, self.w
        local = jax.tree.map(lambda a, b, g0: g0 + jnp.where(world == 1, a, b), self.x_in, self.x_out, g)
        mstate = _mech_state(m)

        def one(total, p):
            y = m.release(local, g, jax.random.fold_in(key, p), None, mstate)
            return total + _tree_vdot(jax.tree.map(jnp.subtract, y, g), w), None

        total, _ = jax.lax.scan(one, jnp.zeros((), jnp.float32), jnp.arange(self.compositions))
        return total / math.sqrt(self.compositions)

    def accountant_epsilon(self):
        return float(self.mech.ledger.epsilons(np.array([self.compositions]))[0])

    def paper_epsilon(self):
        return acc.paper_epsilon(self.mech.z, self.mech.cfg.dp.delta, self.compositions)


@register
class CentralGame(Game):
    """Central DP: T rounds; in each, every client of the federation is Poisson-sampled at rate q
    (the canary only in world 1), releases through mechanism.release (clip), the kept releases are
    summed as the round sums them, and mechanism.finalize_sum noises the sum (every round)."""

    mode: ClassVar[str] = "central"

    def setup(self):
        m, fl = self.mech, self.mech.cfg.fl
        self.g = _zeros(self.shapes)
        c = _canary_direction(m, self.shapes, self.seed)
        self.q = fl.clients_per_round / fl.num_clients
        self.expected = float(fl.clients_per_round)
        n = fl.num_clients
        canary_local = jax.tree.map(lambda x: OVERSHOOT * x[None], c)
        if self.others == "zero":  # clients whose update is zero: the adversary's worst case
            others = jax.tree.map(lambda x: jnp.zeros((n - 1,) + x.shape, jnp.float32), self.shapes)
        elif self.others == "orthogonal":
            others = self._orthogonal(c, n - 1)
        else:
            raise UserError(f"others = {self.others!r} is not allowed; choose zero or orthogonal")
        self.locals = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), canary_local, others)
        self.w, self.mu_round = _weights(c, m.sigma_a, m.sigma_b)
        self.gaussian = self.q >= 1
        self.mu_expected = self.mu_round * math.sqrt(self.compositions) if self.gaussian else None
        self.per_trial_bytes = (3 * n + 6) * self._adapter_bytes()
        self.description = (
            f"central: canary client (update at the clip norm) Poisson-sampled at q={self.q:g} among "
            f"{n - 1} other client(s) ({self.others} updates), every client through "
            f"mechanism.release, the sum through mechanism.finalize_sum, {self.compositions} round(s)"
        )

    def _orthogonal(self, c, n):
        """n other clients' updates (stacked): random, orthogonal to the canary in every clipped
        block (so the release's clipping keeps them orthogonal), OVERSHOOT clip norms long."""

        def project(x, cx):
            axes = tuple(range(1, x.ndim))
            coef = jnp.sum(x * cx, axis=axes, keepdims=True) / jnp.maximum(
                jnp.sum(cx * cx, axis=axes, keepdims=True), 1e-30
            )
            return x - coef * cx

        def one(i):
            r = _random_tree(randomness.key(self.seed, "audit", _OTHERS, i), self.shapes)
            return jax.tree.map(lambda x: OVERSHOOT * x, _canary_like(self.mech, jax.tree.map(project, r, c)))

        return jax.jit(jax.vmap(one))(jnp.arange(n))

    def trial(self, key, world):
        m, g = self.mech, self.g
        n = self.mech.cfg.fl.num_clients
        member = (jnp.arange(n) > 0) | (world == 1)
        stateful = bool(_mech_state(m))  # e.g. an adaptive clip, updated after every round

        def one_round(carry, t):
            total, mstate = carry
            kt = jax.random.fold_in(key, t)
            sampled = jax.random.bernoulli(jax.random.fold_in(kt, 0), self.q, (n,)) & member
            keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(kt, 1), i))(jnp.arange(n))
            released = jax.vmap(lambda lo, k: m.release(lo, g, k, None, mstate))(self.locals, keys)
            kept = jax.vmap(lambda r: m.kept(r, jnp.zeros((), jnp.float32)))(released) & sampled
            f = kept.astype(jnp.float32)
            s = jax.tree.map(lambda r, x: jnp.tensordot(f, r - x[None], axes=1), released, g)
            agg = m.finalize_sum(s, g, jax.random.fold_in(kt, 2), self.expected, mstate)
            score = _tree_vdot(jax.tree.map(lambda a, x: (a - x) * self.expected, agg, g), self.w)
            if stateful:  # the next round's state, as the round computes it
                stats = jax.vmap(lambda lo: m.client_stat(lo, g, mstate))(self.locals)
                mstate = m.update_state(mstate, jnp.sum(f * stats), jax.random.fold_in(kt, 3), self.expected)
            return (total + _sampled_llr(score, self.mu_round, self.q), mstate), None

        init = (jnp.zeros((), jnp.float32), _mech_state(m))
        (total, _), _ = jax.lax.scan(one_round, init, jnp.arange(self.compositions))
        return total

    def accountant_epsilon(self):
        return float(self.mech.ledger.epsilons(np.zeros(1, np.int64), self.compositions)[0])


@register
class DPSGDGame(Game):
    """Record-level DP-SGD: one client's batch holds the canary record, taken with probability q
    (the client's batch rate) at each of local_steps x P steps; each step's noisy gradient comes
    from client.dpsgd_grads with the mechanism's dpsgd_args. The other records are the adversary's
    choice: none (zero gradient), the worst case."""

    mode: ClassVar[str] = "dpsgd"

    def setup(self):
        from ..client import dpsgd_grads
        from ..models.factory import build_model

        m, cfg = self.mech, self.mech.cfg
        self.definition, self.base, self.lora, _, _ = build_model(cfg)
        seq = cfg.data.seq_len
        self.tokens = jax.random.randint(
            randomness.key(self.seed, "audit", _CANARY, 1), (1, seq), 0, cfg.model.vocab_size, jnp.int32
        )
        self.attn = jnp.ones((1, seq), jnp.int32)
        batch = {"tokens": self.tokens, "attention_mask": self.attn, "loss_mask": self.attn}
        # the canary's own gradient, through the same function with no clip and no noise
        _, grad = jax.jit(
            lambda b: dpsgd_grads(
                self.definition, self.base, self.lora, b, 1e30, 0.0, jax.random.key(0), 1.0, freeze_a=cfg.lora.freeze_a
            )
        )(batch)
        norm = float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(grad))))
        if not norm > 0:
            raise UserError("the audit's canary record has a zero gradient under this model; nothing to audit")
        self.grad_norm = norm
        clip = cfg.dp.clip_a
        self.sigma = m.sigma_a
        self.u = jax.tree.map(lambda x: x / norm / max(self.sigma, 1e-30), grad)
        self.mu_step = min(norm, clip) / max(self.sigma, 1e-30)
        self.q = float(m.batch_rate)
        self.steps = cfg.fl.local_steps * self.compositions
        self.gaussian = self.q >= 1
        self.mu_expected = self.mu_step * math.sqrt(self.steps) if self.gaussian else None
        # per-example gradients and activations of one record: a generous guess
        self.per_trial_bytes = max(64 * self._adapter_bytes(), CHUNK_BYTES // 256)
        self.description = (
            f"dpsgd: canary record (gradient norm {norm:.3g}, clip {clip:g}) Poisson-sampled at "
            f"q={self.q:.4g} at each of {self.steps} step(s) ({cfg.fl.local_steps} x "
            f"{self.compositions} participation(s)) through client.dpsgd_grads with "
            f"mechanism.dpsgd_args; no other records"
        )
        self._grads = dpsgd_grads

    def trial(self, key, world):
        m, cfg = self.mech, self.mech.cfg
        clip, sigma, dkey, expected = m.dpsgd_args(jax.random.fold_in(key, 0))

        def one_step(total, t):
            taken = jax.random.bernoulli(jax.random.fold_in(jax.random.fold_in(key, 1), t), self.q) & (world == 1)
            batch = {
                "tokens": self.tokens,
                "attention_mask": self.attn,
                "loss_mask": self.attn * taken.astype(jnp.int32),
            }
            _, noisy = self._grads(
                self.definition,
                self.base,
                self.lora,
                batch,
                clip,
                sigma,
                jax.random.fold_in(dkey, t),
                expected,
                freeze_a=cfg.lora.freeze_a,
            )
            score = _tree_vdot(jax.tree.map(lambda x: x * expected, noisy), self.u)
            return total + _sampled_llr(score, self.mu_step, self.q), None

        total, _ = jax.lax.scan(one_step, jnp.zeros((), jnp.float32), jnp.arange(self.steps))
        return total

    def accountant_epsilon(self):
        return float(self.mech.ledger.epsilons(np.array([self.compositions]))[0])


# ----------------------------------------------------------------------------- bounds


def gdp_bound(in_scores, out_scores, delta: float, confidence: float) -> dict:
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


def bounds(in_scores, out_scores, delta: float, confidence: float = 0.95, gaussian: bool = False) -> dict:
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
        failed = [k for k in ("normality_p_in", "normality_p_out", "equal_variance_p") if gdp[k] < NORMALITY_ALPHA]
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


# ----------------------------------------------------------------------------- driver


def build_game(
    cfg,
    *,
    compositions: int | None = None,
    seed: int | None = None,
    mechanism=None,
    client_sizes=None,
    others: str = "zero",
) -> Game:
    """The game of cfg.dp.mode, on the run's adapter shapes and calibrated mechanism.
    mechanism: a mechanism object to audit instead of modes.build's (e.g. a deliberately broken one).
    compositions: participations (local, dpsgd) or rounds (central); default: the run's (the
    worst client's participations under the seeded schedule; fl.rounds for central)."""
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
        compositions = cfg.fl.rounds if mode == "central" else int(sampling.config_counts(cfg).max())
    if compositions < 1:
        raise UserError(f"compositions must be >= 1, got {compositions}")
    game = GAMES[mode](
        mechanism, shapes, int(compositions), cfg.seed if seed is None else int(seed), others, client_sizes
    )
    game.setup()
    return game


def _client_sizes(cfg):
    from ..data.pipeline import prepare
    from ..models.factory import build_tokenizer

    return [len(p) for p in prepare(cfg, build_tokenizer(cfg)).parts]


def play(game: Game, trials: int, chunk: int | None = None):
    """(in scores, out scores, seconds to compile, seconds to run): trials // 2 games with the canary
    in and the rest without, in one jit (lax.map over chunks of vmapped trials), each with its own
    key randomness.key(seed, "audit", 1, world, i)."""
    n_in, n_out = trials // 2, trials - trials // 2
    limit = chunk or max(1, CHUNK_BYTES // max(game.per_trial_bytes, 1))
    n_chunks = -(-trials // limit)
    chunk = -(-trials // n_chunks)
    pad = n_chunks * chunk - trials  # extra out-world trials, discarded: no remainder to compile twice
    worlds = jnp.concatenate([jnp.ones(n_in, jnp.int32), jnp.zeros(n_out + pad, jnp.int32)])
    ids = jnp.concatenate([jnp.arange(n_in), jnp.arange(n_out + pad)]).astype(jnp.int32)
    seed = game.seed

    def run(ids, worlds):
        def one(x):
            i, w = x
            return game.trial(randomness.key(seed, "audit", _TRIALS, w, i), w)

        return jax.lax.map(one, (ids, worlds), batch_size=chunk)

    t0 = time.perf_counter()
    compiled = jax.jit(run).lower(ids, worlds).compile()
    t1 = time.perf_counter()
    scores = np.asarray(jax.block_until_ready(compiled(ids, worlds)), np.float64)[:trials]
    t2 = time.perf_counter()
    if not np.all(np.isfinite(scores)):
        raise UserError("the audit's scores are not finite (the release overflowed); lower the clip norms")
    return scores[:n_in], scores[n_in:], t1 - t0, t2 - t1


def audit(
    cfg,
    trials: int = 4000,
    *,
    confidence: float = 0.95,
    compositions: int | None = None,
    seed: int | None = None,
    mechanism=None,
    client_sizes=None,
    others: str = "zero",
    chunk: int | None = None,
) -> dict:
    """Play the game of the config's DP mode and report the empirical lower bound beside the
    accountant's epsilon for exactly that game (and, in local mode, the paper's figure)."""
    if not isinstance(trials, (int, np.integer)) or trials < MIN_TRIALS:
        raise UserError(f"trials = {trials} is too few for a confidence bound; give at least {MIN_TRIALS}")
    if not 0.5 < confidence < 1:
        raise UserError(f"confidence must be in (0.5, 1), got {confidence}")
    game = build_game(
        cfg, compositions=compositions, seed=seed, mechanism=mechanism, client_sizes=client_sizes, others=others
    )
    m = game.mech
    delta = m.cfg.dp.delta
    s_in, s_out, t_compile, t_run = play(game, int(trials), chunk)
    out = {
        "mode": game.mode,
        "trials": int(trials),
        "compositions": game.compositions,
        "game": game.description,
        "noise_multiplier": m.z,
        "effective_noise_multiplier": m.z_eff,
        "neighbouring": m.cfg.dp.neighbouring if game.mode == "local" else "add-remove",
        "delta": delta,
        "confidence": confidence,
        "seed": game.seed,
    }
    out.update(bounds(s_in, s_out, delta, confidence, game.gaussian))
    out["mu_expected"] = game.mu_expected
    out["epsilon_accountant"] = game.accountant_epsilon()
    per_release, tracker = game.paper_epsilon()
    out["epsilon_paper"] = tracker
    out["epsilon_paper_per_release"] = per_release
    out["consistent"] = bool(out["epsilon_lower"] <= out["epsilon_accountant"])
    out["paper_falsified"] = None if tracker is None else bool(out["epsilon_lower"] > tracker)
    out["seconds_compile"], out["seconds_run"] = t_compile, t_run
    out["trials_per_second"] = trials / t_run if t_run > 0 else None
    out["verdict"] = verdict(out)
    return out


def verdict(r: dict) -> str:
    if r["consistent"]:
        line = (
            f"consistent: the empirical lower bound {r['epsilon_lower']:.4g} does not exceed the accountant's "
            f"{r['epsilon_accountant']:.4g} (lower bound at {r['confidence']:.4g} confidence)"
        )
    else:
        line = (
            f"VIOLATION: the empirical lower bound {r['epsilon_lower']:.4g} exceeds the accountant's "
            f"{r['epsilon_accountant']:.4g} at {r['confidence']:.4g} confidence: the code does not run the "
            f"mechanism the accountant assumes (a correct mechanism whose accountant is tight shows this with "
            f"probability at most {1 - r['confidence']:.2g}: confirm with another seed)"
        )
    if r.get("paper_falsified"):
        line += f"; the paper's figure {r['epsilon_paper']:.4g} is falsified"
    return line
