"""The pieces of experiments/bench/accelerator_check.py (its entry point: arguments, section dispatch)."""
