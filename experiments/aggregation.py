"""Mean of A and B (the paper) vs stacking (the exact product sum, merged into the base each

Run: python experiments/aggregation.py --scale {smoke,cpu,paper} [--out DIR] [--set key=value ...] [--fresh]
Writes its table (CSV + markdown) and figure (PNG) into DIR (default experiments/results/aggregation/SCALE).
"""

import sys

from fedlora_jax.experiments import main

if __name__ == "__main__":
    sys.exit(main("aggregation"))
