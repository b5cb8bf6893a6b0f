"""Local (the paper) vs central (DP-FedAvg) vs record-level DP-SGD, each calibrated to the

Run: python experiments/dp_modes.py --scale {smoke,cpu,paper} [--out DIR] [--set key=value ...] [--fresh]
Writes its table (CSV + markdown) and figure (PNG) into DIR (default experiments/results/dp_modes/SCALE).
"""

import sys

from fedlora_jax.experiments import main

if __name__ == "__main__":
    sys.exit(main("dp_modes"))
