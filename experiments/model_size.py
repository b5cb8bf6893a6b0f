"""Paper Table IV: two model sizes at the same rank; the noise variance grows with the

Run: python experiments/model_size.py --scale {smoke,cpu,paper} [--out DIR] [--set key=value ...] [--fresh]
Writes its table (CSV + markdown) and figure (PNG) into DIR (default experiments/results/model_size/SCALE).
"""

import sys

from fedlora_jax.experiments import main

if __name__ == "__main__":
    sys.exit(main("model_size"))
