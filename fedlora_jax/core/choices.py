"""The names a run config may choose: the ground floor of the package (it imports nothing of ours).

The configuration validates against these names, so it imports no implementation; the
implementations register against them. Fixed lists (partitions, templates, samplings, evaluation
tasks, clip scopes and targets, neighbouring relations, dtypes, attention implementations) live
here and their modules import them. Registries that grow at run time (DP modes, aggregations,
algorithms: a new one is one class and `@register`) start from the built-in names below, and their
`register` adds a new name here (`add`); each registry checks at import that its built-in table is
exactly these names (tests/test_house.py), so the two cannot drift apart.
"""

from __future__ import annotations

PARTITIONS = ("iid", "dirichlet", "dirichlet_balanced", "by_column")
TEMPLATES = ("alpaca", "chat", "plain")
SAMPLINGS = ("uniform", "poisson", "cyclic")
AVAILABILITIES = ("always", "diurnal", "dropout")  # fl.availability
EVAL_TASKS = ("loss", "exact_match", "multiple_choice")
SCOPES = ("per_matrix", "per_factor", "global")
TARGETS = ("weights", "update")
NEIGHBOURING = ("replace-one", "add-remove")
DTYPES = ("float32", "bfloat16")  # compute dtypes
# how self-attention is computed: einsum (two einsums and a float32 softmax, ours) or fused
# (jax.nn.dot_product_attention, XLA's implementation)
ATTENTION_IMPLS = ("einsum", "fused")
REMAT = ("none", "full", "dots")  # model.remat: what the backward pass recomputes of each layer
NOISE = ("classical", "analytic", "multiplier", "calibrate")

# the registries' built-in names, in their tables' order
BUILT_IN = {
    "dp.mode": ("none", "local", "central", "dpsgd", "bandmf"),
    "fl.aggregation": ("mean", "stack"),
    "fl.algorithm": ("fedavg", "fedprox", "scaffold", "fedavgm", "fedadagrad", "fedyogi", "fedadam"),
}
# the registries' tables themselves (name -> implementation), filled by each registry's `register`
# (privacy.modes.MECHANISMS, aggregation.AGGREGATORS, algorithms' registry are these dicts): this
# module holds them without knowing what they hold, so a name registered at run time is a choice
_TABLES: dict[str, dict] = {kind: {} for kind in BUILT_IN}


def table(kind: str) -> dict:
    """The registry table of `kind` (dp.mode, fl.aggregation, fl.algorithm), shared with its registry."""
    return _TABLES[kind]


def names(kind: str) -> tuple[str, ...]:
    """The names `kind` may take: the built-in ones, then any registered since."""
    return BUILT_IN[kind] + tuple(n for n in _TABLES[kind] if n not in BUILT_IN[kind])
