"""The CLI's commands, one module per concept; `fedlora_jax.cli` parses the command line and calls them.

Top-level imports here stay light (no jax, transformers or torch): each command imports what it needs.
"""
