"""Epsilon of the Gaussian mechanisms the DP modes run, and the noise that meets a target epsilon:
the unsampled Gaussian (exact closed form; RDP beside it), the Poisson-sampled Gaussian (PLD; RDP
beside it), the paper's convention, and the delta a capped cohort or batch adds (see accounting.py
for which mode uses which)."""

from __future__ import annotations

import contextlib
import math

import dp_accounting as dpa
from dp_accounting import pld, rdp

from ...core.errors import UserError
from ...core.numerics import MAX_EXP_EPSILON

MODES = ("local", "central", "dpsgd", "bandmf")
from ...core.choices import NEIGHBOURING  # noqa: E402,F401  (the config's choices)

PLD_DISCRETIZATION = 1e-3


# Below this effective noise multiplier a Poisson-sampled Gaussian's PLD needs a support too large
# to build (z = 0.003 needs > 7 GiB; z = 0.01 takes 40 s per 2 rounds) and its epsilon is in the
# hundreds or more: no meaningful guarantee. Sampled (central, DP-SGD) accounting refuses it.
MIN_SAMPLED_NOISE_MULTIPLIER = 0.05


def check_sampled_noise(z: float, what: str) -> None:
    """One sentence for a noise multiplier the sampled-Gaussian accounting cannot (or need not) handle."""
    if z <= 0:
        raise UserError(
            f"{what}: noise multiplier {z:g} adds no noise, so there is no guarantee to account; "
            "use dp.mode none to train without DP"
        )
    if z < MIN_SAMPLED_NOISE_MULTIPLIER:
        raise UserError(
            f"{what}: effective noise multiplier {z:.3g} is below {MIN_SAMPLED_NOISE_MULTIPLIER:g}, where "
            "epsilon is in the hundreds or more (no meaningful guarantee) and its PLD accounting does not fit "
            "in memory; raise the noise (under dp.noise calibrate: lower dp.epsilon), or use dp.mode none"
        )


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


def sampled_event(z: float, q: float, count: int) -> dpa.SelfComposedDpEvent:
    return dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), int(count))


def sampled_epsilon(
    z: float, q: float, count: int, delta: float, neighbouring: str = "add-remove", with_rdp: bool = True
) -> tuple[float, float | None]:
    """(PLD epsilon, RDP epsilon or None) of `count` Poisson-sampled Gaussian mechanisms."""
    _check(delta=delta, z=z, q=q, neighbouring=neighbouring)
    if count <= 0:
        return 0.0, 0.0
    if z == 0:
        return math.inf, math.inf
    check_sampled_noise(z, "sampled Gaussian accounting")
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
