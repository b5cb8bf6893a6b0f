"""Differential privacy, in three folders:

mechanisms/  one jittable mechanism object per DP mode (registry in __init__), the clipping and
             noise primitives, and the analysis of the noise on LoRA factors
accounting/  host-side accounting with dp-accounting: the Gaussian formulas, the run's ledger,
             the one-shot calculator
audit/       canary games through the real round, lower bounds, detectors and the verdict"""
