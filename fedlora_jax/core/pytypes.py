"""Shared type aliases for annotations across the package (no runtime behaviour; jax only).

JAX code passes nested containers of arrays around (adapters, gradients, optimizer and server
states); these aliases name what a parameter holds where a precise type would be unreadable.
"""

from __future__ import annotations

from typing import Any

import jax

Tree = Any  # a pytree of arrays: an adapter {module path: {lora_a, lora_b}}, gradients, optimizer/server states
Array = jax.Array  # a JAX array (possibly traced inside jit/vmap/scan)
Key = jax.Array  # a PRNG key (typed, from jax.random.key / randomness.key)
ArrayLike = jax.typing.ArrayLike  # anything jnp.asarray takes: a JAX or NumPy array, a NumPy or Python scalar
