"""Clip-and-noise of LoRA factors: pure, jittable, vmappable over clients.

The sensitivity a clipping bounds travels with it: `clip_blocks` says how many separately
clipped blocks (and of which norm) one release holds, and `effective_noise_multiplier` turns
that into the noise multiplier of the equivalent single Gaussian mechanism.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp

from ...core.choices import SCOPES, TARGETS  # noqa: E402,F401  (the config's choices)
from ...core.errors import UserError
from ...core.numerics import DIVISION_FLOOR
from ...core.pytypes import Array, Key, Tree


def _check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise UserError(f"unknown clip scope {scope!r}; allowed: {', '.join(SCOPES)}")


def _is_a(path: jax.tree_util.KeyPath) -> bool:
    return getattr(path[-1], "key", None) == "lora_a"


def clip(tree: Tree, clip_a: Array | float, clip_b: Array | float, scope: str = "per_matrix") -> tuple[Tree, Tree]:
    """Clip a LoRA tree by Frobenius norm; returns (clipped tree, pre-clip norms tree).

    per_matrix: each A and each B of each module and layer on its own (the paper; leaves are
    stacked [layers, ...], so norms are per layer). per_factor: all A jointly to clip_a, all B
    jointly to clip_b. global: the whole adapter as one vector, to clip_a.
    """
    _check_scope(scope)
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    is_a = [_is_a(p) for p, _ in flat]
    sq = [jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim))) for _, x in flat]  # per layer
    if scope == "per_matrix":
        norms = [jnp.sqrt(s) for s in sq]
        bounds = [clip_a if a else clip_b for a in is_a]
    elif scope == "per_factor":
        tot_a = jnp.sqrt(sum(jnp.sum(s) for s, a in zip(sq, is_a) if a))
        tot_b = jnp.sqrt(sum(jnp.sum(s) for s, a in zip(sq, is_a) if not a))
        norms = [tot_a if a else tot_b for a in is_a]
        bounds = [clip_a if a else clip_b for a in is_a]
    else:
        tot = jnp.sqrt(sum(jnp.sum(s) for s in sq))
        norms = [tot] * len(flat)
        bounds = [clip_a] * len(flat)

    out = []
    for (_, x), n, c in zip(flat, norms, bounds):
        factor = jnp.minimum(1.0, c / jnp.maximum(n, DIVISION_FLOOR))
        factor = jnp.reshape(factor, jnp.shape(factor) + (1,) * (x.ndim - jnp.ndim(factor)))
        out.append((x * factor).astype(x.dtype))
    norm_tree = jax.tree_util.tree_unflatten(
        treedef, [jnp.broadcast_to(n, (flat[i][1].shape[0],)) for i, n in enumerate(norms)]
    )
    return jax.tree_util.tree_unflatten(treedef, out), norm_tree


def normal_like(tree: Tree, key: Key) -> Tree:
    """N(0, 1) in the shape of every leaf; leaf i uses fold_in(key, i), so no key is reused across leaves."""
    flat, treedef = jax.tree_util.tree_flatten(tree)
    return jax.tree_util.tree_unflatten(
        treedef, [jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype) for i, x in enumerate(flat)]
    )


def add_scaled(tree: Tree, noise: Tree, sigma_a: Array | float, sigma_b: Array | float) -> Tree:
    """tree + sigma_a x noise on every A entry and + sigma_b x noise on every B entry."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    out = [x + (sigma_a if _is_a(p) else sigma_b) * n for (p, x), n in zip(flat, jax.tree.leaves(noise))]
    return jax.tree_util.tree_unflatten(treedef, out)


def add_noise(tree: Tree, key: Key, sigma_a: Array | float, sigma_b: Array | float) -> Tree:
    """Add N(0, sigma_a^2) to every A entry and N(0, sigma_b^2) to every B entry; leaf i uses
    fold_in(key, i), so no key is reused across leaves."""
    return add_scaled(tree, normal_like(tree, key), sigma_a, sigma_b)


def client_key(round_key: Key, client_id: Array | int) -> Key:
    """The noise key of one client in one round: independent of chunking and device count."""
    return jax.random.fold_in(round_key, client_id)


def privatize(
    local: Tree,
    global_: Tree,
    key: Key,
    *,
    clip_a: float,
    clip_b: float,
    sigma_a: float,
    sigma_b: float,
    scope: str = "per_matrix",
    target: str = "weights",
) -> Tree:
    """The client's release (local DP, the paper's Alg. 1): clip then noise the local factors
    (`weights`) or the update local - global (`update`). Returns the released factors in weight
    space (for `update`: global + noisy clipped update), so aggregation is the same for both."""
    if target not in TARGETS:
        raise UserError(f"unknown clip target {target!r}; allowed: {', '.join(TARGETS)}")
    x = local if target == "weights" else jax.tree.map(jnp.subtract, local, global_)
    x, _ = clip(x, clip_a, clip_b, scope)
    x = add_noise(x, key, sigma_a, sigma_b)
    return x if target == "weights" else jax.tree.map(jnp.add, global_, x)


# ----------------------------------------------------------------------------- sensitivity


def clip_blocks(tree: Tree, scope: str, clip_a: float, clip_b: float) -> tuple[int, int, float, float]:
    """(number of separately clipped A blocks, of B blocks, their bounds) for a release of `tree`
    (shapes only; leaves are stacked over layers). global counts as one A block of bound clip_a."""
    _check_scope(scope)
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    if scope == "per_matrix":
        n_a = sum(x.shape[0] for p, x in flat if _is_a(p))
        n_b = sum(x.shape[0] for p, x in flat if not _is_a(p))
        return n_a, n_b, clip_a, clip_b
    if scope == "per_factor":
        return 1, 1, clip_a, clip_b
    return 1, 0, clip_a, 0.0


def effective_noise_multiplier(
    n_a: int, n_b: int, clip_a: float, clip_b: float, sigma_a: float, sigma_b: float, neighbouring: str = "replace-one"
) -> float:
    """Noise multiplier of the single Gaussian mechanism equivalent to one release.

    Rescaling A by 1/sigma_a and B by 1/sigma_b turns the release into unit-variance Gaussian
    noise on a vector whose L2 sensitivity (add/remove) is sqrt(n_a (C_A/s_A)^2 + n_b (C_B/s_B)^2);
    under replace-one a clipped release can move anywhere in its ball, doubling it.
    """
    if min(sigma_a, sigma_b if n_b else 1.0) <= 0:
        return 0.0
    sens = math.sqrt(n_a * (clip_a / sigma_a) ** 2 + (n_b * (clip_b / sigma_b) ** 2 if n_b else 0.0))
    if neighbouring == "replace-one":
        sens *= 2.0
    return 1.0 / sens


_WARNED = set()


def classical_noise_multiplier(epsilon: float, delta: float) -> float:
    """sigma / C of the classical Gaussian mechanism, sqrt(2 ln(1.25/delta)) / epsilon (the paper's
    formula). It is a valid (epsilon, delta) bound only for epsilon < 1: warns once otherwise."""
    if epsilon <= 0:
        raise UserError(f"epsilon must be > 0, got {epsilon}")
    if not 0 < delta < 1:
        raise UserError(f"delta must be in (0, 1), got {delta}")
    if epsilon >= 1 and "classical" not in _WARNED:
        _WARNED.add("classical")
        warnings.warn(
            f"the classical Gaussian formula is not a valid privacy bound for epsilon >= 1 "
            f"(got {epsilon}); the honest epsilon of this noise is reported separately",
            stacklevel=2,
        )
    return math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon
