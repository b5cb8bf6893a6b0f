"""Seven FL algorithms with and without the paper's local DP (epsilon 25 per release by the

Run: python experiments/algorithms.py --scale {smoke,cpu,paper} [--out DIR] [--set key=value ...] [--fresh]
Writes its table (CSV + markdown) and figure (PNG) into DIR (default experiments/results/algorithms/SCALE).
"""

import sys

from fedlora_jax.experiments import main

if __name__ == "__main__":
    sys.exit(main("algorithms"))
