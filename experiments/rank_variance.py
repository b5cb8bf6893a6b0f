"""Paper Table III / Fig. 5: train with the paper's local DP at each LoRA rank, then measure

Run: python experiments/rank_variance.py --scale {smoke,cpu,paper} [--out DIR] [--set key=value ...] [--fresh]
Writes its table (CSV + markdown) and figure (PNG) into DIR (default experiments/results/rank_variance/SCALE).
"""

import sys

from fedlora_jax.experiments import main

if __name__ == "__main__":
    sys.exit(main("rank_variance"))
