"""Differential privacy: jittable mechanisms, host-side accounting, the noise analysis."""
