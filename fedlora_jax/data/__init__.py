"""Instruction data for federated clients: loading, templates, response-only masks, partitions,
static-shape round batches."""

from .batches import PoissonBatcher, RoundBatcher
from .loading import load_examples
from .partition import partition, partition_summary
from .tokenize import TokenizedData, tokenize_examples

__all__ = [
    "load_examples",
    "partition",
    "partition_summary",
    "RoundBatcher",
    "PoissonBatcher",
    "TokenizedData",
    "tokenize_examples",
]
