"""The paper's epsilon x clip ablation: local DP with the paper's classical noise

Run: python experiments/eps_clip.py --scale {smoke,cpu,paper} [--out DIR] [--set key=value ...] [--fresh]
Writes its table (CSV + markdown) and figure (PNG) into DIR (default experiments/results/eps_clip/SCALE).
"""

import sys

from fedlora_jax.experiments import main

if __name__ == "__main__":
    sys.exit(main("eps_clip"))
