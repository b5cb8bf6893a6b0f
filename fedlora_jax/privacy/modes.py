"""One mechanism object per DP mode, registered in one table.

A mechanism owns everything its mode changes: the noise it calibrates on the host (from the config
and the run's seeded sampling schedule), the jitted client-side transform (the release, or DP-SGD's
per-example clip + noise inside local training), the jitted server-side step (central noise), the
aggregation weights it allows, its dp-accounting ledger, and the list of values a run may publish.
The round (simulation.py), the run loop (runner.py), the planner and the CLI ask the object; the
mode string appears only in the config and in this table.

Adding a mode is one subclass with `name = "..."` decorated with `@register`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from .. import algorithms, sampling
from .. import lora as lora_lib
from ..errors import UserError
from . import accounting as acc
from . import mechanisms as prim

MECHANISMS: dict[str, type[Mechanism]] = {}

# values of a metrics row that come from the clients' un-noised training (outside any guarantee)
CLIENT_FIELDS = ("loss", "first_loss", "update_norm", "dropped")
UNPROTECTED_PREFIX = "unprotected_"
EPS_FLOOR = 1e-30  # guards a division by a zero weight sum


def register(cls):
    """Class decorator: add a mechanism to the table under cls.name."""
    MECHANISMS[cls.name] = cls
    return cls


def names() -> tuple[str, ...]:
    return tuple(MECHANISMS)


def dp_names() -> tuple[str, ...]:
    return tuple(n for n, c in MECHANISMS.items() if c.private)


def build(cfg, lora, client_sizes=None) -> Mechanism:
    """The mechanism of cfg.dp.mode, calibrated for this run. lora: the adapter (arrays or shapes);
    client_sizes: examples per client (dpsgd needs them; None for shape-only planning)."""
    mode = cfg.dp.mode
    if mode not in MECHANISMS:
        raise UserError(f"dp.mode = {mode!r} is not allowed; choose one of: {', '.join(MECHANISMS)}")
    return MECHANISMS[mode](cfg, lora, client_sizes)


@dataclasses.dataclass
class Mechanism:
    """No DP (`none`): the release is the local adapter, aggregation weights are example counts,
    every value may be published."""

    name: ClassVar[str] = "none"
    private: ClassVar[bool] = False
    sums_updates: ClassVar[bool] = False  # True: the server sums clipped updates and noises the sum
    participation_public: ClassVar[bool] = True  # who takes part may be published
    controls_private: ClassVar[bool] = True  # SCAFFOLD controls are covered by the guarantee
    record_level: ClassVar[bool] = False  # True: Poisson batches and per-example noise (DP-SGD)
    adaptive_clipping: ClassVar[bool] = False  # dp.adaptive_clip is defined for this mode
    sampling_secret: ClassVar[bool] = False  # the client draw must stay secret (amplification by sampling)

    cfg: Any
    lora: Any
    client_sizes: Any = None
    ledger: acc.Ledger | None = dataclasses.field(default=None, init=False)
    info: dict = dataclasses.field(default_factory=dict, init=False)
    sigma_a: float = dataclasses.field(default=0.0, init=False)
    sigma_b: float = dataclasses.field(default=0.0, init=False)

    def __post_init__(self):
        self.check()
        self.calibrate()

    # ------------------------------------------------------------------ host side
    def check(self) -> None:
        """Cross-field checks of the config against what this mechanism can account for."""
        fl = self.cfg.fl
        if self.private and algorithms.client_hook(fl).keeps_client_state and not self.controls_private:
            raise UserError(
                f"fl.algorithm {fl.algorithm} with dp.mode {self.name}: its per-client state (for "
                f"SCAFFOLD, the control variates) is computed from the clients' un-noised updates, "
                f"which this mode's guarantee does not cover; use another algorithm, dp.mode dpsgd, "
                f"or dp.mode none"
            )
        if self.cfg.dp.adaptive_clip and not self.adaptive_clipping:
            raise UserError(f"dp.adaptive_clip is defined for dp.mode central, not {self.name}")
        if self.private and self.cfg.data.eval_per_client:
            raise UserError(
                f"data.eval_per_client evaluates on held-out shares of the clients' own data, which "
                f"dp.mode {self.name}'s guarantee does not cover (the published eval loss would "
                f"leak them); use the shared held-out split (data.eval_per_client false)"
            )

    def calibrate(self) -> None:
        self.info = {"mechanism": "no DP"}

    @property
    def publish_client_metrics(self) -> bool:
        return not self.private or self.cfg.dp.publish_client_metrics

    def published_name(self, field: str) -> str | None:
        """The name under which a client-derived metric is published (None: not published).
        Outside the guarantee in a DP mode, the name carries UNPROTECTED_PREFIX."""
        if not self.private:
            return field
        if not self.cfg.dp.publish_client_metrics:
            return None
        return UNPROTECTED_PREFIX + field

    def publishes_cohort(self) -> bool:
        return self.participation_public or self.publish_client_metrics

    def privacy_row(self, participations: np.ndarray) -> dict:
        """The privacy columns of a metrics row after a round (empty without DP)."""
        return {}

    def budget_exceeded(self, next_ids) -> bool:
        budget = self.cfg.dp.budget
        return self.ledger is not None and budget is not None and self.ledger.worst_after(next_ids) > budget

    def summary(self, participations: np.ndarray, last_row: dict | None) -> dict:
        out = dict(self.info)
        out["outside_guarantee"] = []
        return out

    # ------------------------------------------------------------------ jitted, per client
    def dpsgd_args(self, key):
        """(clip, sigma, key, expected batch) for record-level DP-SGD inside local training, or None."""
        return None

    def init_state(self) -> dict:
        """The mechanism's own server state (arrays), carried in the round's state (e.g. the clip)."""
        return {}

    def release(self, local, global_, key, rank=None, mstate=None):
        """What one client sends (its adapter, in weight space)."""
        return local

    def client_stat(self, local, global_, mstate):
        """A per-client scalar the server sums (adaptive clipping: was the update within the clip?)."""
        return jnp.zeros((), jnp.float32)

    def update_state(self, mstate: dict, stat_sum, key, expected_cohort) -> dict:
        """The mechanism's state for the next round (from privatized quantities only)."""
        return mstate

    def round_values(self, mstate: dict) -> dict:
        """Accounted values of the round that a run may publish (e.g. the clip used)."""
        return {}

    def kept(self, released, loss):
        """Which clients the server aggregates: finite releases (and, without DP, finite losses)."""
        return _all_finite(released) & jnp.isfinite(loss)

    def weight(self, num_examples):
        """Aggregation weight of a kept client."""
        return num_examples

    # ------------------------------------------------------------------ jitted, server
    def finalize_sum(self, total, global_, key, expected_cohort, mstate=None):
        """Central-style aggregate from the sum of clipped updates (only when sums_updates)."""
        raise NotImplementedError


register(Mechanism)


def _all_finite(tree):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


class _DP(Mechanism):
    """Shared by the DP modes: publishes only accounted values by default; uniform weights unless
    the example counts are declared public."""

    private: ClassVar[bool] = True

    def kept(self, released, loss):
        # a function of the release only (post-processing); the un-noised loss plays no part
        return _all_finite(released)

    def weight(self, num_examples):
        if self.cfg.dp.public_counts:
            return num_examples
        return jnp.ones_like(num_examples)

    def summary(self, participations: np.ndarray, last_row: dict | None) -> dict:
        out = dict(self.info)
        led = self.ledger
        out.update(
            epsilon=led.worst(),
            epsilon_mean=led.mean(),
            epsilon_paper=(last_row or {}).get("epsilon_paper"),
            epsilon_paper_tracker=(last_row or {}).get("epsilon_paper_tracker"),
            delta=(last_row or {}).get("delta", self.cfg.dp.delta),
            aggregation_weights=(
                "example counts (dp.public_counts: the counts are assumed public)"
                if self.cfg.dp.public_counts
                else "uniform over kept clients"
            ),
        )
        if self.participation_public:
            out["max_participations"] = int(participations.max())
        elif self.publish_client_metrics:
            out[UNPROTECTED_PREFIX + "max_participations"] = int(participations.max())
        out["outside_guarantee"] = (
            [UNPROTECTED_PREFIX + f for f in CLIENT_FIELDS]
            + ([] if self.participation_public else [UNPROTECTED_PREFIX + "clients"])
            if self.cfg.dp.publish_client_metrics
            else []
        )
        if self.cfg.dp.noise_seed is not None:
            out["noise_seed"] = (
                "fixed by dp.noise_seed in config.yaml: anyone with the config can reproduce and "
                "remove the noise, so the guarantee does NOT hold against them"
            )
            out["outside_guarantee"].append("noise (dp.noise_seed is published in config.yaml)")
        else:
            out["noise_seed"] = (
                "secret: drawn from OS entropy, kept only in checkpoints/ (the simulated server's "
                "private state, with the participation counts): do not publish checkpoints/"
            )
        if self.record_level and not self.cfg.dp.public_counts:
            out["outside_guarantee"].append(
                "batch_sampling_rate, noise_multiplier and epsilon are functions of the "
                "smallest client's example count (dp.public_counts: false)"
            )
        out["published"] = (
            "held-out evaluation on the shared held-out split (server data, not any client's), "
            "privatized aggregates, epsilon/delta"
            + (
                "; client training metrics marked 'unprotected_' are OUTSIDE the guarantee"
                if self.cfg.dp.publish_client_metrics
                else ""
            )
        )
        return out


@register
class LocalDP(_DP):
    """The paper: each client clips its factors (or update) and adds Gaussian noise before sending.
    A client's releases compose over its participations; who takes part is public (no amplification)."""

    name: ClassVar[str] = "local"
    controls_private: ClassVar[bool] = False

    def calibrate(self) -> None:
        cfg = self.cfg
        dp, fl = cfg.dp, cfg.fl
        global_scope = dp.scope == "global"
        self.clip_b = dp.clip_a if global_scope else dp.clip_b
        n_a, n_b, ca, cb = prim.clip_blocks(self.lora, dp.scope, dp.clip_a, dp.clip_b)
        if cfg.lora.freeze_a:  # A is frozen, shared and public: only B is released (and clipped)
            n_a, n_b, ca, cb = (0, 1, dp.clip_a, dp.clip_a) if global_scope else (0, n_b, ca, cb)
        neighbouring = dp.neighbouring
        factor = 1.0 / prim.effective_noise_multiplier(n_a, n_b, ca, cb, ca, cb if n_b else 1.0, neighbouring)
        self.planned = int(sampling.config_counts(cfg).max())
        if dp.noise == "classical":
            z = prim.classical_noise_multiplier(dp.epsilon, dp.delta)
        elif dp.noise == "analytic":
            z = acc.gaussian_multiplier_for(dp.epsilon, 1, dp.delta) * factor
        elif dp.noise == "multiplier":
            z = dp.noise_multiplier
        else:  # calibrate: the most-sampled client of the seeded schedule ends at the target
            z = acc.gaussian_multiplier_for(dp.epsilon, self.planned, dp.delta) * factor
        self.z, self.z_eff = z, z / factor
        self.sigma_a = z * dp.clip_a
        self.sigma_b = z * self.clip_b
        self.blocks = (n_a, n_b)
        self.ledger = acc.Ledger(
            "local",
            fl.num_clients,
            self.z_eff,
            dp.delta,
            neighbouring,
            sampling_rate=fl.clients_per_round / fl.num_clients,
        )
        self.info = {
            "noise_multiplier": z,
            "effective_noise_multiplier": self.z_eff,
            "sigma_a": self.sigma_a,
            "sigma_b": self.sigma_b,
            "clipped_blocks": [n_a, n_b],
            "neighbouring": neighbouring,
            "delta": dp.delta,
            "epsilon_of": "worst client (its whole data)",
            "mechanism": (
                f"local DP: Gaussian, {n_a} A and {n_b} B blocks clipped ({dp.scope}), "
                f"sigma_A {self.sigma_a:.4g}, sigma_B {self.sigma_b:.4g}, {neighbouring}, "
                f"composed over each client's participations, no amplification"
            ),
        }

    def release(self, local, global_, key, rank=None, mstate=None):
        dp, freeze_a = self.cfg.dp, self.cfg.lora.freeze_a
        if freeze_a:  # clip and noise B alone; A is the public frozen A
            local = lora_lib.map_modules(lambda a, b: (jnp.zeros_like(a), b), local)
            global_in = lora_lib.map_modules(lambda a, b: (jnp.zeros_like(a), b), global_)
        else:
            global_in = global_
        released = prim.privatize(
            local,
            global_in,
            key,
            clip_a=dp.clip_a,
            clip_b=self.clip_b,
            sigma_a=self.sigma_a,
            sigma_b=self.sigma_b,
            scope=dp.scope,
            target=dp.target,
        )
        if rank is not None:  # post-processing: keep the padded entries of a low-rank client at zero
            released = lora_lib.rank_mask(released, rank)
        if freeze_a:
            released = lora_lib.map_modules(lambda a, a0, b, b0: (a0, b), released, global_)
        return released

    def privacy_row(self, participations):
        p = int(participations.max())
        per_release, tracker = acc.paper_epsilon(self.z, self.cfg.dp.delta, p)
        return {
            "epsilon": self.ledger.worst(),
            "epsilon_mean": self.ledger.mean(),
            "delta": self.cfg.dp.delta,
            "epsilon_rdp": acc.gaussian_epsilon_rdp(self.z_eff, p, self.cfg.dp.delta),
            "epsilon_paper": per_release,
            "epsilon_paper_tracker": tracker,
        }


@register
class CentralDP(_DP):
    """DP-FedAvg (user level): each client's update is clipped to C; the trusted server adds
    N(0, (zC)^2) to the sum in EVERY round (empty or all-dropped cohorts included) and divides by
    the expected cohort; Poisson client sampling at rate q amplifies (the draw must be secret)."""

    name: ClassVar[str] = "central"
    sums_updates: ClassVar[bool] = True
    participation_public: ClassVar[bool] = False
    controls_private: ClassVar[bool] = False
    adaptive_clipping: ClassVar[bool] = True
    sampling_secret: ClassVar[bool] = True

    def check(self) -> None:
        super().check()
        fl = self.cfg.fl
        if self.cfg.dp.adaptive_clip and self.cfg.dp.scope != "global":
            raise UserError(
                f"dp.adaptive_clip clips each update as one vector: it needs dp.scope global, not {self.cfg.dp.scope}"
            )
        if fl.sampling != "poisson":
            raise UserError(
                "dp.mode central needs fl.sampling poisson (its accounting assumes Poisson client sampling)"
            )
        if fl.aggregation == "stack":
            raise UserError(
                "dp.mode central with fl.aggregation stack is not supported: central noise is "
                "added to the sum of clipped adapter updates, which stacking does not release; use "
                "fl.aggregation mean, or dp.mode local with stack"
            )

    def calibrate(self) -> None:
        dp, fl = self.cfg.dp, self.cfg.fl
        self.clip_b = dp.clip_a if dp.scope == "global" else dp.clip_b
        n_a, n_b, ca, cb = prim.clip_blocks(self.lora, dp.scope, dp.clip_a, dp.clip_b)
        factor = 1.0 / prim.effective_noise_multiplier(n_a, n_b, ca, cb, ca, cb if n_b else 1.0, "add-remove")
        q = fl.clients_per_round / fl.num_clients
        if dp.noise == "classical":
            z = prim.classical_noise_multiplier(dp.epsilon, dp.delta)
        elif dp.noise == "analytic":
            z = acc.gaussian_multiplier_for(dp.epsilon, 1, dp.delta)
        elif dp.noise == "multiplier":
            z = dp.noise_multiplier
        else:
            z = acc.sampled_multiplier_for(dp.epsilon, q, fl.rounds, dp.delta) * factor
        self.z, self.z_eff = z, z / factor
        self.adaptive = dp.adaptive_clip
        self.z_update = z
        if self.adaptive:  # Andrew et al. 2021: z^-2 = z_update^-2 + (2 sigma_count)^-2
            self.count_noise = dp.clip_count_noise or fl.clients_per_round / 20.0
            if z >= 2 * self.count_noise:
                raise UserError(
                    f"dp.adaptive_clip: the noise multiplier {z:.4g} leaves nothing for the update once "
                    f"the count noise {self.count_noise:.4g} is paid (needs multiplier < 2 x "
                    f"dp.clip_count_noise); raise dp.clip_count_noise (default K/20) or lower the noise"
                )
            self.z_update = (z**-2 - (2 * self.count_noise) ** -2) ** -0.5
        self.sigma_a, self.sigma_b = self.z_update * dp.clip_a, self.z_update * self.clip_b
        self.blocks = (n_a, n_b)
        self.ledger = acc.Ledger("central", fl.num_clients, self.z_eff, dp.delta, "add-remove", sampling_rate=q)
        self.capacity, self.overflow = sampling.poisson_capacity(fl.num_clients, fl.clients_per_round)
        self.info = {
            "noise_multiplier": z,
            "effective_noise_multiplier": self.z_eff,
            "sigma_a": self.sigma_a,
            "sigma_b": self.sigma_b,
            "clipped_blocks": [n_a, n_b],
            "neighbouring": "add-remove",
            "delta": dp.delta,
            "epsilon_of": "every client (its whole data)",
            "mechanism": (
                f"central DP: Gaussian, {n_a} A and {n_b} B blocks clipped ({dp.scope}), "
                f"sigma_A {self.sigma_a:.4g}, sigma_B {self.sigma_b:.4g} on the sum in every "
                f"round, add-remove, Poisson client sampling q={q:g}, PLD; cohorts padded to "
                f"{self.capacity} slots (overflow probability {self.overflow:.2g} per round, "
                f"added to delta)"
            ),
        }
        if self.adaptive:
            self.info.update(
                adaptive_clip=True,
                update_noise_multiplier=self.z_update,
                clip_count_noise=self.count_noise,
                target_quantile=dp.target_quantile,
                clip_lr=dp.clip_lr,
                initial_clip=dp.clip_a,
            )
            self.info["mechanism"] += (
                f"; adaptive clipping toward the {dp.target_quantile:g} quantile (initial "
                f"{dp.clip_a:g}, lr {dp.clip_lr:g}): update noise multiplier "
                f"{self.z_update:.4g} x clip and count noise {self.count_noise:.4g}, "
                f"accounted together as one Gaussian of multiplier {z:.4g}"
            )

    def init_state(self) -> dict:
        return {"clip": jnp.asarray(self.cfg.dp.clip_a, jnp.float32)} if self.adaptive else {}

    def _clips(self, mstate):
        if self.adaptive:
            return mstate["clip"], mstate["clip"]
        return self.cfg.dp.clip_a, self.clip_b

    def release(self, local, global_, key, rank=None, mstate=None):
        clip_a, clip_b = self._clips(mstate)
        upd, _ = prim.clip(jax.tree.map(jnp.subtract, local, global_), clip_a, clip_b, self.cfg.dp.scope)
        return jax.tree.map(jnp.add, global_, upd)

    def client_stat(self, local, global_, mstate):
        if not self.adaptive:
            return jnp.zeros((), jnp.float32)
        upd = jax.tree.map(jnp.subtract, local, global_)
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(upd)))
        # centred: b - 1/2, so adding or removing a client moves the sum by 1/2 (the sensitivity the
        # combined multiplier z^-2 = z_u^-2 + (2 sigma_count)^-2 assumes)
        return (norm <= mstate["clip"]).astype(jnp.float32) - 0.5

    def update_state(self, mstate, stat_sum, key, expected_cohort):
        """C <- C exp(-lr (b - gamma)), b = (sum of (b_i - 1/2) + N(0, sigma_count^2)) / K + 1/2, an unbiased
        estimate of the fraction of clients within the clip."""
        if not self.adaptive:
            return mstate
        dp = self.cfg.dp
        noisy = (stat_sum + self.count_noise * jax.random.normal(key, (), jnp.float32)) / expected_cohort + 0.5
        return {"clip": mstate["clip"] * jnp.exp(-dp.clip_lr * (noisy - dp.target_quantile))}

    def round_values(self, mstate):
        return {"clip": mstate["clip"]} if self.adaptive else {}

    def weight(self, num_examples):
        return jnp.ones_like(num_examples)  # the sum's sensitivity is C only if every client counts once

    def finalize_sum(self, total, global_, key, expected_cohort, mstate=None):
        clip_a, clip_b = self._clips(mstate)  # the noise scales with the clip of this round
        noisy = prim.add_noise(total, key, self.z_update * clip_a, self.z_update * clip_b)
        return jax.tree.map(lambda x, t: x + t / expected_cohort, global_, noisy)

    def privacy_row(self, participations):
        eps = self.ledger.worst()
        # a capped cohort is within total-variation distance rounds x overflow of the analysed one
        delta = self.cfg.dp.delta + acc.tv_delta(eps, self.ledger.rounds * self.overflow)
        return {"epsilon": eps, "epsilon_mean": self.ledger.mean(), "delta": delta}


@register
class DPSGD(_DP):
    """Record-level DP-SGD inside each client: Poisson batches at rate q_c = min(1, B / n_c) (accounted
    at the largest rate; the rates use the clients' example counts), per-example clip dp.clip_a,
    N(0, (z C)^2) on each step's clipped sum. Everything a client sends is post-processing of noisy
    steps, so SCAFFOLD's controls are covered."""

    name: ClassVar[str] = "dpsgd"
    record_level: ClassVar[bool] = True

    def calibrate(self) -> None:
        from ..data.batches import poisson_capacity, poisson_capacity_bound

        dp, fl = self.cfg.dp, self.cfg.fl
        if self.client_sizes is None:  # shape-only planning: the capacity bound needs no data
            q, capacity, overflow = 1.0, poisson_capacity_bound(fl.batch_size), 0.0
        else:
            sizes = sorted({int(n) for n in self.client_sizes})
            if not sizes or sizes[0] < 1:
                raise UserError("dp.mode dpsgd: a client holds no training examples; use fewer clients or more data")
            q = min(1.0, fl.batch_size / sizes[0])
            capacity, overflow = poisson_capacity(sizes, fl.batch_size)
        planned = int(sampling.config_counts(self.cfg).max())
        if dp.noise == "multiplier":
            z = dp.noise_multiplier
        elif dp.noise == "calibrate":
            z = acc.sampled_multiplier_for(dp.epsilon, q, fl.local_steps * planned, dp.delta, "add-remove")
        else:
            raise UserError(f"dp.noise = {dp.noise!r} is not defined for dp.mode dpsgd; choose calibrate or multiplier")
        self.z = self.z_eff = z
        self.sigma_a = self.sigma_b = z * dp.clip_a
        self.batch_rate, self.capacity, self.overflow = q, capacity, overflow
        self.ledger = acc.Ledger(
            "dpsgd", fl.num_clients, z, dp.delta, "add-remove", sampling_rate=q, local_steps=fl.local_steps
        )
        self.info = {
            "noise_multiplier": z,
            "effective_noise_multiplier": z,
            "sigma_a": self.sigma_a,
            "sigma_b": self.sigma_b,
            "clipped_blocks": [0, 0],
            "neighbouring": "add-remove",
            "delta": dp.delta,
            "batch_sampling_rate": q,
            "batch_capacity": capacity,
            "overflow_probability": overflow,
            "epsilon_of": "a record of the worst client",
            "mechanism": (
                f"dpsgd (record level): Poisson-sampled Gaussian per local step, rate q={q:.4g} "
                f"(largest client rate; the rates use the clients' example counts), "
                f"per-example clip {dp.clip_a:g}, sigma {self.sigma_a:.4g} on the clipped sum, "
                f"add-remove, {fl.local_steps} steps per participation, PLD; batches padded to "
                f"{capacity} (overflow probability {overflow:.2g} per step, added to delta)"
            ),
        }

    def dpsgd_args(self, key):
        return (self.cfg.dp.clip_a, self.sigma_a, key, float(self.cfg.fl.batch_size))

    def truncation_delta(self, epsilon: float, steps: int) -> float:
        """The delta padded batches add: total-variation distance <= a record's sampled steps x the
        per-step overflow probability (accounting.tv_delta)."""
        return acc.tv_delta(epsilon, steps * self.overflow)

    def privacy_row(self, participations):
        eps = self.ledger.worst()
        return {
            "epsilon": eps,
            "epsilon_mean": self.ledger.mean(),
            "delta": self.cfg.dp.delta
            + self.truncation_delta(eps, self.cfg.fl.local_steps * int(participations.max())),
        }
