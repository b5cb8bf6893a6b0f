"""Diurnal availability at equal target epsilon (2 and 8; N 1,000 and 10,000, K 100): DP-FedAvg with
the noise amplification by sampling would claim (and the honest epsilon it really has), DP-FedAvg
accounted honestly (no amplification), BandMF (DP-FTRL) with cyclic participation, and no DP; held-out
loss over rounds (fedlora_jax.experiments.availability).

Run: python experiments/availability.py --scale {smoke,cpu,paper} [--out DIR] [--set key=value ...] [--fresh]
Writes its table (CSV + markdown) and figure (PNG) into DIR (default experiments/results/availability/SCALE).
"""

import sys

from fedlora_jax.experiments import main

if __name__ == "__main__":
    sys.exit(main("availability"))
