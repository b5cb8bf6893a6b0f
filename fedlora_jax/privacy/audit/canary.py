"""The audit's canaries and score helpers: a canary direction at the clip norm in every clipped block,
the likelihood-ratio weights that turn an observation into a unit-variance score, and the sampled
Gaussian's log likelihood ratio (see audit.py for the games they serve)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from ...adapters import lora as lora_lib
from ...core import randomness
from ...core.errors import UserError
from ...core.numerics import DIVISION_FLOOR
from ...core.pytypes import Tree
from ..mechanisms import primitives as prim

if TYPE_CHECKING:
    from ...config.run_config import RunConfig

OVERSHOOT = 10.0  # canary inputs are this many clip norms long: the release must clip them

# sub-streams of the "audit" randomness domain: key(seed, "audit", STREAM, ...)
_CANARY, _TRIALS, _OTHERS = 0, 1, 2


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
        sig = _per_leaf_sigma(d, max(sigma_a, DIVISION_FLOOR), max(sigma_b, DIVISION_FLOOR))
        mu = jnp.sqrt(sum(jnp.sum(jnp.square(x / s)) for x, s in zip(jax.tree.leaves(d), jax.tree.leaves(sig))))
        return jax.tree.map(lambda x, s: x / (s * s) / jnp.maximum(mu, DIVISION_FLOOR), d, sig), mu

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


def _random_tree(seed: int, shapes, *ids: int):
    """A standard normal tree of the adapter's shapes, drawn on the host (randomness.np_rng(seed,
    "audit", *ids)): a canary is one draw, and a jitted threefry per leaf took seconds to compile."""
    rng = randomness.np_rng(seed, "audit", *ids)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), shapes)


def adapter_shapes(cfg: RunConfig) -> Tree:
    """The run's adapter as shapes (ShapeDtypeStruct leaves), without loading any weights."""
    from ...models import abstract_model
    from ...models.factory import build_model_config

    lc = cfg.lora.to_lora_config()
    mc = build_model_config(cfg)
    lc.check(mc)
    return abstract_model(mc, lc)[2]


def _zeros(shapes):
    return jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), shapes)


def _canary_direction(mech, shapes, seed, zero_a=False):
    """A random direction whose every separately clipped block lies exactly at its clip norm (the
    release's own clip applied to a far longer random vector)."""

    r = _random_tree(seed, shapes, _CANARY, 0)
    if zero_a:
        r = lora_lib.map_modules(lambda a, b: (jnp.zeros_like(a), b), r)
    return jax.jit(lambda t: _canary_like(mech, t))(r)


def _canary_like(mech, r):
    """r rescaled so that each separately clipped block of the release lies at its clip norm."""
    dp = mech.cfg.dp
    clip_b = dp.clip_a if dp.scope == "global" else dp.clip_b
    return prim.clip(jax.tree.map(lambda x: x * 1e6, r), dp.clip_a, clip_b, dp.scope)[0]
