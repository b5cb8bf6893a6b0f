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

The formulas are in gaussian_accounting.py, the run-time ledger in ledger.py and the one-shot
calculator in accounting_report.py; this module is their front door (`from . import accounting as acc`).
"""

from __future__ import annotations

from .gaussian import (  # noqa: F401  (re-exported)
    MAX_EXP_EPSILON,
    MIN_SAMPLED_NOISE_MULTIPLIER,
    MODES,
    NEIGHBOURING,
    PLD_DISCRETIZATION,
    _check,
    _quiet_absl,
    _relation,
    check_sampled_noise,
    gaussian_epsilon,
    gaussian_epsilon_rdp,
    gaussian_multiplier_for,
    paper_epsilon,
    sampled_epsilon,
    sampled_event,
    sampled_multiplier_for,
    tv_delta,
)
from .ledger import Ledger  # noqa: F401  (re-exported)
from .report import report  # noqa: F401  (re-exported)
