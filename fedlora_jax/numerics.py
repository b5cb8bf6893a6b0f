"""Numerical constants shared by the jitted code: one home, so a guard means the same everywhere."""

from __future__ import annotations

# The floor a divisor is raised to before dividing: a zero norm (a zero gradient or update, which
# clipping leaves as it is), a zero weight sum (nothing kept in a round) or a zero noise scale
# never divides by zero. Far below any norm, weight or sigma a run produces, so it changes nothing else.
DIVISION_FLOOR = 1e-30
