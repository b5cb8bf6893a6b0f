"""Numerical constants shared by the jitted code: one home, so a guard means the same everywhere."""

from __future__ import annotations

# The floor a divisor is raised to before dividing: a zero norm (a zero gradient or update, which
# clipping leaves as it is), a zero weight sum (nothing kept in a round) or a zero noise scale
# never divides by zero. Far below any norm, weight or sigma a run produces, so it changes nothing else.
DIVISION_FLOOR = 1e-30

# The smallest probability a capacity's overflow tail is taken to: below it (a huge epsilon) a Poisson
# cohort or batch is padded to its whole population, so it never overflows (sampling.capacity_tail).
SMALLEST_TAIL = 1e-300
