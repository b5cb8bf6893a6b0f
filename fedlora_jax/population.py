"""Deprecated: the population experiment moved to `fedlora_jax.experiments.populations` (with the
other experiments). This module re-exports it for one release and warns."""

import warnings

from .experiments.populations import *  # noqa: F401,F403
from .experiments.populations import GRIDS, plot_population, population  # noqa: F401

warnings.warn(
    "fedlora_jax.population moved to fedlora_jax.experiments.populations; the old path goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)
