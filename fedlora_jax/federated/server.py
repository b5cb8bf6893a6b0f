"""Server optimizers as optax transformations on the pseudo-gradient g = global - aggregate.

FedAvg: sgd(1); FedAvgM: sgd with momentum; FedAdagrad / FedYogi / FedAdam: Reddi et al.,
"Adaptive Federated Optimization" (2021), as OpenFedLLM runs them: with d = -g,
m = b1 m + (1 - b1) d; v per rule (adagrad: v + d^2; yogi: v - (1 - b2) d^2 sign(v - d^2);
adam: b2 v + (1 - b2) d^2); x = x + lr m / (sqrt(v) + tau); v starts at tau^2, no bias correction.
FedProx and SCAFFOLD use the FedAvg server step (their work is on the clients). The registry of
algorithms (server step + client hook) is fedlora_jax.federated.algorithms.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ..core.errors import UserError


class FedOptState(NamedTuple):
    m: optax.Updates
    v: optax.Updates


FEDOPT_RULES = ("adagrad", "yogi", "adam")  # the adaptive server optimizers of Reddi et al. (2021)


def fedopt(kind: str, lr: float, b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3) -> optax.GradientTransformation:
    if kind not in FEDOPT_RULES:
        raise UserError(f"unknown FedOpt rule {kind!r}; allowed: {', '.join(FEDOPT_RULES)}")

    def init(params: optax.Params) -> FedOptState:
        return FedOptState(
            jax.tree.map(jnp.zeros_like, params), jax.tree.map(lambda p: jnp.full_like(p, tau**2), params)
        )

    def update(
        grads: optax.Updates, state: FedOptState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, FedOptState]:
        d = jax.tree.map(jnp.negative, grads)
        m = jax.tree.map(lambda m_, d_: b1 * m_ + (1 - b1) * d_, state.m, d)
        if kind == "adagrad":
            v = jax.tree.map(lambda v_, d_: v_ + d_ * d_, state.v, d)
        elif kind == "yogi":
            v = jax.tree.map(lambda v_, d_: v_ - (1 - b2) * d_ * d_ * jnp.sign(v_ - d_ * d_), state.v, d)
        else:
            v = jax.tree.map(lambda v_, d_: b2 * v_ + (1 - b2) * d_ * d_, state.v, d)
        updates = jax.tree.map(lambda m_, v_: lr * m_ / (jnp.sqrt(v_) + tau), m, v)
        return updates, FedOptState(m, v)

    return optax.GradientTransformation(init, update)


def cosine_lr(round_index: int, rounds: int, lr: float, lr_min: float) -> float:
    """The paper's schedule: cosine over rounds from lr to lr_min, constant within a round
    (optax's cosine_decay_schedule with alpha = lr_min / lr)."""
    if lr == 0:
        return 0.0
    schedule = optax.cosine_decay_schedule(init_value=lr, decay_steps=rounds, alpha=lr_min / lr)
    return float(schedule(round_index))
