"""Utility against cohort size K at fixed honest epsilon, for populations N up to 10,000 clients:
central DP-FedAvg (fixed and adaptive clip), FFA-LoRA under central DP, the paper's local
mechanism, and no DP (fedlora_jax.experiments.populations).

Run: python experiments/population.py --scale {smoke,cpu,paper} [--out DIR] [--set key=value ...] [--fresh]
Writes its table (CSV + markdown) and figure (PNG) into DIR (default experiments/results/population/SCALE).
"""

import sys

from fedlora_jax.experiments import main

if __name__ == "__main__":
    sys.exit(main("population"))
