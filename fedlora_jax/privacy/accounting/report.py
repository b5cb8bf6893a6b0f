"""The one-shot privacy calculator: epsilon of a planned run (or the noise that meets a target)."""

from __future__ import annotations

import math

import numpy as np

from ...core.errors import UserError
from .gaussian import (
    _check,
    gaussian_epsilon,
    gaussian_epsilon_rdp,
    gaussian_multiplier_for,
    paper_epsilon,
    sampled_epsilon,
    sampled_multiplier_for,
)


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
    if mode == "bandmf":  # cyclic groups: a client takes part once every b = ceil(N/K) rounds
        if clients is None or clients_per_round is None:
            raise UserError("bandmf mode needs clients and clients per round (its cyclic groups)")
        participations = (
            participations if participations is not None else -(-rounds // -(-clients // clients_per_round))
        )
    if participations is None:
        if clients is not None and clients_per_round is not None:
            from ...federated import sampling as sampler

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
    if mode in ("local", "bandmf"):  # bandmf: ONE Gaussian of sensitivity sqrt(k) x C (unit-norm strategy)
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
        if mode == "bandmf":
            out.update(
                epsilon_paper=None,
                epsilon_paper_tracker=None,
                mechanism=(
                    f"BandMF (DP-FTRL): correlated Gaussian noise on the sum of clipped updates, cyclic "
                    f"participation ({participations} of {rounds} rounds per client), sensitivity "
                    f"sqrt({participations}) x C for any band <= the groups (unit-norm strategy columns), "
                    f"{tensors} clipped tensor(s), ONE Gaussian, no amplification (exact closed form)"
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
