"""The paper's noise analysis of a noisy LoRA product, exact and by Monte Carlo.

With B (m x r), A (r x n), beta ~ N(0, s_b^2) on B and alpha ~ N(0, s_a^2) on A:
    E[(B + beta)(A + alpha)] = B A                                     (unbiased)
    sum of entry variances = n s_a^2 ||B||_F^2 + m s_b^2 ||A||_F^2 + m n r s_a^2 s_b^2
(B alpha has entry variance s_a^2 ||B_i,:||^2 over n columns; beta A has s_b^2 ||A_:,j||^2 over
m rows; beta alpha has r s_a^2 s_b^2 per entry.) The paper prints m and n swapped in the first
two terms; this module uses the exact form.
"""

from __future__ import annotations

import csv
import functools
import os
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from ...core.pytypes import Array, Key

if TYPE_CHECKING:
    from collections.abc import Callable

STATS_COLUMNS = [
    "round_client",
    "layer",
    "A_norm",
    "B_norm",
    "Var_Balpha",
    "Var_betaA",
    "Var_ba",
    "Total_Var",
    "mean_orig_update",
    "mean_noisy_update",
    "mean_update_diff",
    "mc_total_var",
    "mc_total_var_se",
]


def exact_variance_terms(b: Array, a: Array, s_a: float, s_b: float) -> dict:
    """The three variance terms and their sum for B (m x r), A (r x n)."""
    m, r = b.shape
    n = a.shape[1]
    nb2, na2 = float(jnp.sum(b * b)), float(jnp.sum(a * a))
    terms = {"Var_Balpha": n * s_a**2 * nb2, "Var_betaA": m * s_b**2 * na2, "Var_ba": m * n * r * s_a**2 * s_b**2}
    terms["Total_Var"] = sum(terms.values())
    return terms


@functools.partial(jax.jit, static_argnames=("samples",))
def monte_carlo(b: Array, a: Array, s_a: float, s_b: float, key: Key, samples: int = 2000) -> dict[str, Array]:
    """Monte-Carlo moments of D = (B + beta)(A + alpha) - B A over `samples` draws:
    mean_d (entrywise mean of D), se_d (its standard error), total_var (sum over entries of the
    sample variance) and total_var_se (standard error of that estimate)."""

    def draw(k: Key) -> Array:
        kb, ka = jax.random.split(k)
        beta = s_b * jax.random.normal(kb, b.shape, b.dtype)
        alpha = s_a * jax.random.normal(ka, a.shape, a.dtype)
        return (b + beta) @ (a + alpha) - b @ a

    d = jax.lax.map(draw, jax.random.split(key, samples), batch_size=min(samples, 256))
    mean_d = jnp.mean(d, axis=0)
    var_d = jnp.var(d, axis=0, ddof=1)
    per_sample = jnp.sum(jnp.square(d - mean_d[None]), axis=(1, 2))  # its mean is the total variance
    return {
        "mean_d": mean_d,
        "se_d": jnp.sqrt(var_d / samples),
        "total_var": jnp.mean(per_sample) * samples / (samples - 1),
        "total_var_se": jnp.std(per_sample, ddof=1) / jnp.sqrt(samples),
    }


def round_stats(
    lora: dict,
    sigma_a: float,
    sigma_b: float,
    key: Key,
    label: str,
    samples: int = 200,
    hf_names: Callable[[tuple[str, ...], int], str] | None = None,
) -> list[dict]:
    """Per module and layer: norms, exact variance terms, and Monte-Carlo means of the product
    before and after noise (the columns the paper's code writes, plus the MC variance)."""
    from ...adapters.lora import modules

    rows = []
    for mi, (path, m) in enumerate(modules(lora)):
        a_all, b_all = np.asarray(m["lora_a"]), np.asarray(m["lora_b"])
        for layer in range(a_all.shape[0]):
            a, b = jnp.asarray(a_all[layer]), jnp.asarray(b_all[layer])
            mc = monte_carlo(b, a, sigma_a, sigma_b, jax.random.fold_in(key, mi * 100003 + layer), samples)
            orig = float(jnp.mean(b @ a))
            diff = float(jnp.mean(mc["mean_d"]))
            name = hf_names(path, layer) if hf_names else f"{'.'.join(path)}.{layer}"
            rows.append(
                {
                    "round_client": label,
                    "layer": name,
                    "A_norm": float(jnp.linalg.norm(a)),
                    "B_norm": float(jnp.linalg.norm(b)),
                    **exact_variance_terms(b, a, sigma_a, sigma_b),
                    "mean_orig_update": orig,
                    "mean_noisy_update": orig + diff,
                    "mean_update_diff": diff,
                    "mc_total_var": float(mc["total_var"]),
                    "mc_total_var_se": float(mc["total_var_se"]),
                }
            )
    return rows


def write_stats_csv(path: str | os.PathLike, rows: list[dict], append: bool = False) -> None:
    new = not append or not os.path.exists(path)
    with open(path, "a" if append else "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=STATS_COLUMNS)
        if new:
            w.writeheader()
        w.writerows(rows)
