"""Instruction data for federated clients: loading, templates, response-only masks, partitions,
static-shape round batches."""

from .batches import PoissonBatcher, RoundBatcher
from .partition import partition, partition_summary
from .tokenize import TokenizedData, tokenize_examples


def __getattr__(name: str):
    # loading imports `datasets` (about a second): only on first use, so that the config, which
    # reads data.partition.PARTITIONS, stays light
    if name == "load_examples":
        from .loading import load_examples

        return load_examples
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "load_examples",
    "partition",
    "partition_summary",
    "RoundBatcher",
    "PoissonBatcher",
    "TokenizedData",
    "tokenize_examples",
]
