"""Numerical constants and checks shared across the package: one home, so a guard means the same everywhere."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The floor a divisor is raised to before dividing: a zero norm (a zero gradient or update, which
# clipping leaves as it is), a zero weight sum (nothing kept in a round) or a zero noise scale
# never divides by zero. Far below any norm, weight or sigma a run produces, so it changes nothing else.
DIVISION_FLOOR = 1e-30

# The smallest probability a capacity's overflow tail is taken to: below it (a huge epsilon) a Poisson
# cohort or batch is padded to its whole population, so it never overflows (sampling.capacity_tail).
SMALLEST_TAIL = 1e-300

# exp() of a larger epsilon overflows a float64: the terms (1 + e^epsilon) x ... are capped there
MAX_EXP_EPSILON = 700.0


def all_finite(tree: object) -> jax.Array:
    """One boolean: every element of every leaf of `tree` is finite (jittable)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))
