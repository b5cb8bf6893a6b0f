"""One mechanism object per DP mode, registered in one table.

A mechanism owns everything its mode changes: the noise it calibrates on the host (from the config
and the run's seeded sampling schedule), the jitted client-side transform (the release, or DP-SGD's
per-example clip + noise inside local training), the jitted server-side step (central noise), the
aggregation weights it allows, its dp-accounting ledger, and the list of values a run may publish.
The round (simulation.py), the run loop (runner.py), the planner and the CLI ask the object; the
mode string appears only in the config and in this table.

Adding a mode is one subclass with `name = "..."` decorated with `@register`, in a module this one
imports below.

The base class and the table are in modes_base.py, each DP mode in its own module (modes_local.py,
modes_central.py, modes_dpsgd.py), registered when this module imports it: importing
`fedlora_jax.privacy.mechanisms` always gives the complete table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...core.errors import UserError
from .base import (  # noqa: F401  (re-exported)
    _DP,
    CLIENT_FIELDS,
    MECHANISMS,
    UNPROTECTED_PREFIX,
    Mechanism,
    _all_finite,
    register,
)

# isort: off
# the DP modes register on import, in this order (the order names() and dp_names() list them in)
from .local import LocalDP  # noqa: F401  (re-exported)
from .central import CentralDP  # noqa: F401  (re-exported)
from .dpsgd import DPSGD  # noqa: F401  (re-exported)
from .bandmf import BandMF  # noqa: F401  (re-exported)

# isort: on

if TYPE_CHECKING:
    from collections.abc import Sequence

    import numpy as np

    from ...config.run_config import RunConfig
    from ...core.pytypes import Tree


def names() -> tuple[str, ...]:
    return tuple(MECHANISMS)


def dp_names() -> tuple[str, ...]:
    return tuple(n for n, c in MECHANISMS.items() if c.private)


def build(cfg: RunConfig, lora: Tree, client_sizes: Sequence[int] | np.ndarray | None = None) -> Mechanism:
    """The mechanism of cfg.dp.mode, calibrated for this run. lora: the adapter (arrays or shapes);
    client_sizes: examples per client (dpsgd needs them; None for shape-only planning)."""
    mode = cfg.dp.mode
    if mode not in MECHANISMS:
        raise UserError(f"dp.mode = {mode!r} is not allowed; choose one of: {', '.join(MECHANISMS)}")
    return MECHANISMS[mode](cfg, lora, client_sizes)
