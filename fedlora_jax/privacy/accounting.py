"""Privacy accounting on the host (numpy + dp-accounting), for the three DP modes.

- local (the paper): each client's release is a Gaussian mechanism with effective noise
  multiplier z_eff (see mechanisms.effective_noise_multiplier); a client's releases compose over
  every round it takes part in; the server sees who takes part, so sampling gives no
  amplification. T releases of multiplier z compose exactly to one Gaussian of multiplier
  z/sqrt(T): the headline figure uses that closed form (what PLD computes, without PLD's cost at
  large epsilon); RDP is reported beside it.
- central (DP-FedAvg, user level): the server adds N(0, (zC)^2) to the sum of clipped client
  updates; Poisson client sampling at rate q; PLD and RDP over the rounds.
- dpsgd (record level): a Poisson-sampled Gaussian per local step (batch sampling rate q),
  composed over local steps x participations; PLD and RDP.

Every figure is (epsilon, delta)-DP for the stated neighbouring relation. replace-one is
accounted by doubling the sensitivity of the unsampled Gaussian (exact), and with
dp-accounting's REPLACE_ONE relation for the sampled mechanisms' PLD (its RDP accountant does
not distinguish the relations, so sampled replace-one RDP is not reported).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import dp_accounting as dpa
import numpy as np
from dp_accounting import pld, rdp

from ..errors import UserError

MODES = ("local", "central", "dpsgd")
NEIGHBOURING = ("replace-one", "add-remove")
PLD_DISCRETIZATION = 1e-3
MAX_EXP_EPSILON = 700.0  # exp() of a larger epsilon overflows a float64


def tv_delta(epsilon: float, tv: float) -> float:
    """The delta a mechanism within total-variation distance `tv` of an (epsilon, delta)-DP one adds:
    it is (epsilon, delta + (1 + e^epsilon) tv)-DP (capped cohorts and batches use it)."""
    if not tv:
        return 0.0
    return (1.0 + math.exp(min(epsilon, MAX_EXP_EPSILON))) * tv


def _check(delta=None, z=None, q=None, neighbouring=None, mode=None):
    if delta is not None and not 0 < delta < 1:
        raise UserError(f"delta must be in (0, 1), got {delta}")
    if z is not None and z < 0:
        raise UserError(f"noise multiplier must be >= 0, got {z}")
    if q is not None and not 0 < q <= 1:
        raise UserError(f"sampling rate must be in (0, 1], got {q}")
    if neighbouring is not None and neighbouring not in NEIGHBOURING:
        raise UserError(f"unknown neighbouring relation {neighbouring!r}; allowed: {', '.join(NEIGHBOURING)}")
    if mode is not None and mode not in MODES:
        raise UserError(f"unknown DP mode {mode!r}; allowed: {', '.join(MODES)}")


def _relation(neighbouring: str):
    return (
        dpa.NeighboringRelation.REPLACE_ONE
        if neighbouring == "replace-one"
        else dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
    )


# ----------------------------------------------------------------------------- unsampled Gaussian


def gaussian_epsilon(z_eff: float, compositions: int, delta: float) -> float:
    """Exact epsilon of `compositions` Gaussian releases of noise multiplier z_eff (sensitivity
    already folded in): the composition is one Gaussian with multiplier z_eff/sqrt(T)."""
    _check(delta=delta, z=z_eff)
    if compositions <= 0:
        return 0.0
    if z_eff == 0:
        return math.inf
    return float(dpa.get_epsilon_gaussian(z_eff / math.sqrt(compositions), delta))


def gaussian_epsilon_rdp(z_eff: float, compositions: int, delta: float) -> float:
    """The RDP accountant's bound for the same composition (looser than the exact figure)."""
    _check(delta=delta, z=z_eff)
    if compositions <= 0:
        return 0.0
    if z_eff == 0:
        return math.inf
    acc = rdp.RdpAccountant()
    acc.compose(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(z_eff), int(compositions)))
    return float(acc.get_epsilon(delta))


def gaussian_multiplier_for(epsilon: float, compositions: int, delta: float) -> float:
    """The z_eff whose `compositions`-fold composition has exactly `epsilon` (inverse of
    gaussian_epsilon, via the analytic Gaussian mechanism)."""
    if epsilon <= 0:
        raise UserError(f"target epsilon must be > 0, got {epsilon}")
    _check(delta=delta)
    return float(dpa.get_sigma_gaussian(epsilon, delta)) * math.sqrt(max(compositions, 1))


# ----------------------------------------------------------------------------- sampled Gaussian


@contextlib.contextmanager
def _quiet_absl():
    from absl import logging as absl_logging

    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)


def sampled_event(z: float, q: float, count: int):
    return dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), int(count))


def sampled_epsilon(
    z: float, q: float, count: int, delta: float, neighbouring: str = "add-remove", with_rdp: bool = True
):
    """(PLD epsilon, RDP epsilon or None) of `count` Poisson-sampled Gaussian mechanisms."""
    _check(delta=delta, z=z, q=q, neighbouring=neighbouring)
    if count <= 0:
        return 0.0, 0.0
    if z == 0:
        return math.inf, math.inf
    event = sampled_event(z, q, count)
    acc = pld.PLDAccountant(_relation(neighbouring), value_discretization_interval=PLD_DISCRETIZATION)
    try:
        acc.compose(event)
    except ValueError as e:  # dp-accounting cannot build the PLD of a vanishing noise ("Maximum allowed size")
        raise UserError(
            f"noise multiplier {z:g} is too small to account with PLD (its epsilon is astronomically large): {e}"
        ) from None
    eps_pld = float(acc.get_epsilon(delta))
    eps_rdp = None
    if neighbouring == "add-remove" and with_rdp:
        r = rdp.RdpAccountant()
        r.compose(event)
        with _quiet_absl():  # orders whose series does not converge are dropped, with a warning each
            eps_rdp = float(r.get_epsilon(delta))
    return eps_pld, eps_rdp


def sampled_multiplier_for(
    epsilon: float, q: float, count: int, delta: float, neighbouring: str = "add-remove"
) -> float:
    """Noise multiplier whose `count` sampled Gaussians reach `epsilon` (PLD), by
    dp_accounting.calibrate_dp_mechanism."""
    if epsilon <= 0:
        raise UserError(f"target epsilon must be > 0, got {epsilon}")
    _check(delta=delta, q=q, neighbouring=neighbouring)
    try:
        # RDP (cheap, and an upper bound on the PLD epsilon) brackets the answer from above; PLD at
        # tiny multipliers needs huge supports, so the PLD search never goes below half of it
        with _quiet_absl():  # the RDP series warns (harmlessly) at multipliers below 1 during the search
            z_rdp = float(
                dpa.calibrate_dp_mechanism(
                    rdp.RdpAccountant,
                    lambda z: sampled_event(z, q, count),
                    epsilon,
                    delta,
                    dpa.LowerEndpointAndGuess(1e-2, 1.0),
                    tol=1e-4,
                )
            )
        if neighbouring == "replace-one":
            z_rdp *= 2.0  # replace-one is at most twice the add/remove sensitivity
        return float(
            dpa.calibrate_dp_mechanism(
                lambda: pld.PLDAccountant(_relation(neighbouring), value_discretization_interval=PLD_DISCRETIZATION),
                lambda z: sampled_event(z, q, count),
                epsilon,
                delta,
                dpa.ExplicitBracketInterval(z_rdp / 2, z_rdp * 1.01),
                tol=1e-4,
            )
        )
    except (ValueError, RuntimeError, dpa.mechanism_calibration.NoBracketIntervalFoundError) as e:
        raise UserError(
            f"no noise multiplier reaches epsilon {epsilon} at delta {delta} over {count} "
            f"sampled steps at rate {q}: {e}"
        ) from e


# ----------------------------------------------------------------------------- the paper's convention


def paper_epsilon(z: float, delta: float, participations: int) -> tuple[float, float]:
    """The paper-convention figures (NOT valid bounds for epsilon >= 1): the classical per-release
    epsilon sqrt(2 ln(1.25/delta)) / (sigma/C) with sensitivity C, and the paper code's tracker,
    which composes releases as sigma_total = (sum 1/sigma^2)^(-1/2), i.e. per-release * sqrt(P)."""
    _check(delta=delta, z=z)
    if z == 0:
        return math.inf, math.inf
    per_release = math.sqrt(2 * math.log(1.25 / delta)) / z
    return per_release, per_release * math.sqrt(max(participations, 0))


# ----------------------------------------------------------------------------- run-time ledger


@dataclasses.dataclass
class Ledger:
    """Per-client privacy of a run. For `local`, epsilon depends only on a client's participation
    count; `central` is one figure for every client (user level, sampled); `dpsgd` per client.

    z_eff: local: the effective multiplier of one release (sensitivity folded in); central and
    dpsgd: the noise multiplier relative to the clip norm.
    """

    mode: str
    num_clients: int
    z_eff: float
    delta: float
    neighbouring: str = "replace-one"
    sampling_rate: float = 1.0  # central: client rate; dpsgd: batch rate
    local_steps: int = 1  # dpsgd
    participations: np.ndarray = None
    rounds: int = 0

    def __post_init__(self):
        _check(delta=self.delta, z=self.z_eff, neighbouring=self.neighbouring, mode=self.mode)
        if self.participations is None:
            self.participations = np.zeros(self.num_clients, np.int64)
        self._cache = {}

    def _eps(self, count: int) -> float:
        if count not in self._cache:
            if self.mode == "local":
                self._cache[count] = gaussian_epsilon(self.z_eff, count, self.delta)
            elif self.mode == "central":
                self._cache[count] = sampled_epsilon(
                    self.z_eff, self.sampling_rate, count, self.delta, self.neighbouring, with_rdp=False
                )[0]
            else:
                self._cache[count] = sampled_epsilon(
                    self.z_eff,
                    self.sampling_rate,
                    count * self.local_steps,
                    self.delta,
                    self.neighbouring,
                    with_rdp=False,
                )[0]
        return self._cache[count]

    def record(self, client_ids) -> None:
        self.rounds += 1
        np.add.at(self.participations, np.asarray(client_ids, np.int64), 1)

    def epsilons(self, participations=None, rounds=None) -> np.ndarray:
        parts = self.participations if participations is None else participations
        if self.mode == "central":
            e = self._eps(self.rounds if rounds is None else rounds)
            return np.full(self.num_clients, e)
        return np.array([self._eps(int(c)) for c in parts])

    def worst(self) -> float:
        return float(self.epsilons().max())

    def mean(self) -> float:
        return float(self.epsilons().mean())

    def worst_after(self, client_ids) -> float:
        """The worst client's epsilon if these clients took part in one more round."""
        parts = self.participations.copy()
        np.add.at(parts, np.asarray(client_ids, np.int64), 1)
        return float(self.epsilons(parts, self.rounds + 1).max())

    def state_dict(self) -> dict:
        return {"participations": self.participations.tolist(), "rounds": self.rounds}

    def load_state_dict(self, state: dict) -> None:
        self.participations = np.asarray(state["participations"], np.int64)
        self.rounds = int(state["rounds"])


# ----------------------------------------------------------------------------- one-shot report


def report(
    mode: str,
    *,
    delta: float,
    noise_multiplier: float | None = None,
    rounds: int = 1,
    tensors: int = 1,
    neighbouring: str | None = None,
    participations: int | None = None,
    clients: int | None = None,
    clients_per_round: int | None = None,
    sampling_rate: float | None = None,
    local_steps: int = 1,
    batch_sampling_rate: float | None = None,
    target_epsilon: float | None = None,
    seed: int = 0,
    sampling: str = "uniform",
) -> dict:
    """Epsilon of a planned run (or, with target_epsilon, the noise multiplier that meets it).

    noise_multiplier is sigma / C of each separately clipped tensor. local: one release holds
    `tensors` such tensors; a client releases `participations` times (default: the expected
    rounds * K / N, rounded up). central: C bounds each client's whole update; clients are
    sampled at rate q (K/N or sampling_rate) for `rounds` rounds. dpsgd: per-example clip C,
    batch sampling rate q_b, local_steps per participation.

    participations (local, dpsgd) defaults to the WORST client: the most rounds any client takes
    part in under the run's seeded schedule (clients, clients_per_round, rounds, seed, sampling:
    the same sampler a run uses); without a client count, every round. The spread over clients
    (min / median / max) is reported.
    """
    _check(delta=delta, mode=mode)
    neighbouring = neighbouring or ("replace-one" if mode == "local" else "add-remove")
    _check(neighbouring=neighbouring)
    if rounds < 1:
        raise UserError(f"rounds must be >= 1, got {rounds}")
    if tensors < 1:
        raise UserError(f"tensors must be >= 1, got {tensors}")
    q = sampling_rate
    if clients is not None:
        if clients < 1:
            raise UserError(f"clients must be >= 1, got {clients}")
        if clients_per_round is not None:
            if not 1 <= clients_per_round <= clients:
                raise UserError(f"clients per round must be in [1, clients={clients}], got {clients_per_round}")
            q = q or clients_per_round / clients
    spread = None
    if participations is None:
        if clients is not None and clients_per_round is not None:
            from .. import sampling as sampler

            counts = sampler.participation_counts(seed, clients, clients_per_round, sampling, rounds)
            spread = {"min": int(counts.min()), "median": float(np.median(counts)), "max": int(counts.max())}
            participations = spread["max"]
        else:
            participations = rounds  # no schedule to simulate: the worst case is every round
    if participations < 0 or participations > rounds:
        raise UserError(f"participations must be in [0, rounds={rounds}], got {participations}")
    if target_epsilon is None and noise_multiplier is None:
        raise UserError("give a noise multiplier (or sigma and clip), or a target epsilon")

    out = {
        "mode": mode,
        "delta": delta,
        "neighbouring": neighbouring,
        "rounds": rounds,
        "participations_spread": spread,
        "seed": seed if spread else None,
    }
    if mode == "local":
        factor = math.sqrt(tensors) * (2.0 if neighbouring == "replace-one" else 1.0)
        if target_epsilon is not None:
            noise_multiplier = gaussian_multiplier_for(target_epsilon, participations, delta) * factor
        z_eff = noise_multiplier / factor
        eps, eps_rdp = (
            gaussian_epsilon(z_eff, participations, delta),
            gaussian_epsilon_rdp(z_eff, participations, delta),
        )
        per_release, tracker = paper_epsilon(noise_multiplier, delta, participations)
        out.update(
            tensors=tensors,
            participations=participations,
            effective_noise_multiplier=z_eff,
            epsilon_paper=per_release,
            epsilon_paper_tracker=tracker,
            mechanism=(
                f"Gaussian, {tensors} separately clipped tensor(s) per release, sensitivity "
                f"{'2C' if neighbouring == 'replace-one' else 'C'} each, composed over "
                f"{participations} release(s), no amplification (exact closed form)"
            ),
        )
    else:
        if mode == "central" and q is None:
            raise UserError(
                "central mode needs a client sampling rate: give clients and clients per round, or a sampling rate"
            )
        if mode == "dpsgd":
            if batch_sampling_rate is None:
                raise UserError("dpsgd mode needs --batch-sampling-rate (batch size / client examples)")
            if local_steps < 1:
                raise UserError(f"local steps must be >= 1, got {local_steps}")
            rate, count = batch_sampling_rate, local_steps * participations
            what = (
                f"Poisson-sampled Gaussian per local step (rate {rate}), {count} steps "
                f"({local_steps} x {participations} participations), record level"
            )
        else:
            rate, count = q, rounds
            what = (
                f"Gaussian on the sum of clipped client updates ({tensors} separately clipped tensor(s), "
                f"sensitivity C sqrt({tensors})), Poisson client sampling (rate {rate}), {rounds} rounds, "
                f"user level"
            )
        # central: L separately clipped tensors have a joint sensitivity C sqrt(L) (dpsgd clips one vector)
        factor = math.sqrt(tensors) if mode == "central" else 1.0
        if target_epsilon is not None:
            noise_multiplier = sampled_multiplier_for(target_epsilon, rate, count, delta, neighbouring) * factor
        eps, eps_rdp = sampled_epsilon(noise_multiplier / factor, rate, count, delta, neighbouring)
        out["effective_noise_multiplier"] = noise_multiplier / factor
        out.update(
            participations=participations, sampling_rate=rate, compositions=count, mechanism=what, epsilon_paper=None
        )
    out.update(noise_multiplier=noise_multiplier, epsilon_pld=eps, epsilon_rdp=eps_rdp)
    return out
