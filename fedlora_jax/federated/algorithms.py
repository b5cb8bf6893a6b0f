"""FL algorithms as parts of the round (optax's pattern: small objects composed by the round).

An algorithm is a server step (an optax transformation of the pseudo-gradient global - aggregate,
from fedlora_jax.federated.server) and a client hook: what it adds to local training and the state it keeps.
FedAvg and the FedOpt family train plainly (the base `ClientHook`); FedProx adds its proximal
gradient; SCAFFOLD corrects the gradient with control variates and keeps one per client.

A hook's life in a round (all inside jit; `hstate` is state["hook"], a dict of arrays):
  context(hstate, cid)                 -> what client `cid` needs (vmapped over the cohort)
  correct(grads, lora, start, ctx)     -> the gradient of one local step, after DP-SGD's noise
  finish(ctx, start, local, steps, lr) -> the client's new per-client state (or None)
  carry(hstate, global_lora) / accumulate(hcarry, new, kept, ids) / finalize(hstate, hcarry, num_clients)
                                       -> fold the kept clients' new states into the server state
A new algorithm is `register(name, server_step, hook)`; nothing else needs editing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax

from ..core import choices
from ..core.errors import UserError
from ..core.pytypes import Tree
from .server import FEDOPT_RULES, fedopt

if TYPE_CHECKING:
    from ..config.sections import FLSection


class ClientHook:
    """Plain local training: no correction, no per-client state."""

    # per-client state computed from the un-noised local update (SCAFFOLD's controls): only a DP
    # mechanism whose guarantee covers it (controls_private) may run such an algorithm
    keeps_client_state: bool = False

    def init_state(self, lora: Tree, num_clients: int) -> dict:
        return {}

    def context(self, hstate: dict, cid: jax.Array) -> Any:
        return None

    def correct(self, grads: Tree, lora: Tree, start: Tree, ctx: Any) -> Tree:
        return grads

    def finish(self, ctx: Any, start: Tree, local: Tree, steps: int, lr: jax.Array | float) -> Tree | None:
        return None

    def carry(self, hstate: dict, global_lora: Tree) -> dict:
        return {}

    def accumulate(self, hcarry: dict, new: Tree | None, kept: jax.Array, ids: jax.Array) -> dict:
        return hcarry

    def finalize(self, hstate: dict, hcarry: dict, num_clients: int) -> dict:
        return hstate


class FedProx(ClientHook):
    """FedProx (Li et al., 2020): the gradient of mu/2 ||w - w_global||^2 joins each local step.
    It depends on no example, so under DP-SGD it is added after the noise."""

    def __init__(self, mu: float) -> None:
        self.mu = mu

    def correct(self, grads: Tree, lora: Tree, start: Tree, ctx: Any) -> Tree:
        if not self.mu:
            return grads
        return jax.tree.map(lambda gr, x, s: gr + self.mu * (x - s), grads, lora, start)


class Scaffold(ClientHook):
    """SCAFFOLD (Karimireddy et al., 2020), option II: the gradient is corrected by c - c_i; after
    K local steps c_i+ = c_i - c + (x - y_i) / (K lr); the server adds the mean change over all N
    clients to c. Padded cohort slots carry the out-of-range id N: their writes are dropped."""

    keeps_client_state = True

    def init_state(self, lora: Tree, num_clients: int) -> dict:
        return {
            "global": jax.tree.map(jnp.zeros_like, lora),
            "clients": jax.tree.map(lambda x: jnp.zeros((num_clients,) + x.shape, x.dtype), lora),
        }

    def context(self, hstate: dict, cid: jax.Array) -> tuple[Tree, Tree]:
        return hstate["global"], jax.tree.map(lambda c: c[cid], hstate["clients"])

    def correct(self, grads: Tree, lora: Tree, start: Tree, ctx: tuple[Tree, Tree]) -> Tree:
        c, ci = ctx
        return jax.tree.map(lambda gr, c_, ci_: gr + c_ - ci_, grads, c, ci)

    def finish(self, ctx: tuple[Tree, Tree], start: Tree, local: Tree, steps: int, lr: jax.Array | float) -> Tree:
        c, ci = ctx
        return jax.tree.map(lambda ci_, c_, x, y: ci_ - c_ + (x - y) / (steps * lr), ci, c, start, local)

    def carry(self, hstate: dict, global_lora: Tree) -> dict:
        return {"clients": hstate["clients"], "dc": jax.tree.map(jnp.zeros_like, global_lora)}

    def accumulate(self, hcarry: dict, new: Tree, kept: jax.Array, ids: jax.Array) -> dict:
        old = hcarry["clients"]
        cur = jax.tree.map(lambda c: c.at[ids].get(mode="fill", fill_value=0), old)
        keep = lambda n, o: jnp.where(kept.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)  # noqa: E731
        new = jax.tree.map(keep, new, cur)
        return {
            "dc": jax.tree.map(lambda d, n, o: d + jnp.sum(n - o, axis=0), hcarry["dc"], new, cur),
            "clients": jax.tree.map(lambda o, n: o.at[ids].set(n, mode="drop"), old, new),
        }

    def finalize(self, hstate: dict, hcarry: dict, num_clients: int) -> dict:
        return {
            "global": jax.tree.map(lambda c0, d: c0 + d / num_clients, hstate["global"], hcarry["dc"]),
            "clients": hcarry["clients"],
        }


@dataclass(frozen=True)
class Algorithm:
    name: str
    server_step: Callable[[Any], optax.GradientTransformation]  # FLSection -> the server step
    hook: Callable[[Any], ClientHook]  # FLSection -> the client hook


def _sgd(fl: FLSection) -> optax.GradientTransformation:
    return optax.sgd(fl.server_lr)


_REGISTRY: dict[str, Algorithm] = choices.table("fl.algorithm")  # the config's fl.algorithm choices


def register(
    name: str,
    server_step: Callable[[FLSection], optax.GradientTransformation],
    hook: Callable[[FLSection], ClientHook] = lambda fl: ClientHook(),
) -> None:
    """Add an algorithm: `server_step(fl)` an optax transformation, `hook(fl)` a ClientHook."""
    _REGISTRY[name] = Algorithm(name, server_step, hook)


register("fedavg", _sgd)
register("fedprox", _sgd, lambda fl: FedProx(fl.prox_mu))
register("scaffold", _sgd, lambda fl: Scaffold())
register("fedavgm", lambda fl: optax.sgd(fl.server_lr, momentum=fl.server_momentum))
for _rule in FEDOPT_RULES:
    register(
        f"fed{_rule}",
        lambda fl, rule=_rule: fedopt(rule, fl.server_lr, fl.server_b1, fl.server_b2, fl.server_tau),
    )


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get(name: str) -> Algorithm:
    if name not in _REGISTRY:
        raise UserError(f"unknown algorithm {name!r}; allowed: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def server_optimizer(fl: FLSection) -> optax.GradientTransformation:
    """The server step for an FLSection (its algorithm and server hyper-parameters)."""
    return get(fl.algorithm).server_step(fl)


def client_hook(fl: FLSection) -> ClientHook:
    return get(fl.algorithm).hook(fl)
