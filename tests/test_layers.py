"""The package's architecture, read from its own imports: no import circle, no import from a lower
layer to a higher one in the order DEVELOPERS.md's module map gives (bottom first), and no module
over 300 lines.

  ground      core/ (errors, pytypes, numerics, choices, randomness), _imports: import nothing of
              ours but each other
  config      config/ (the run's frozen config, sections, checks, YAML), models/config (the model's
              and LoRA's frozen configs): pure data and validation
  model_data  models/, adapters/, data/, evaluation/: the model, its adapters, the data, scoring
  round       federated/ (the round), privacy/mechanisms/ and privacy/accounting/
  run         runs/ (the run and what it leaves), privacy/audit/ (games through the real round)
  interface   cli, commands/, experiments/, the package's __init__

Every import counts (module level, inside functions, under TYPE_CHECKING), except those inside a
module-level `__getattr__`: the deprecated re-export shims that keep an old import path working for
one release (they warn)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fedlora_jax"
MAX_LINES = 300

LAYERS = {
    "ground": ("core", "core.*", "_imports"),
    "config": ("config", "config.*", "models.config"),
    "model_data": ("models", "models.*", "adapters", "adapters.*", "data", "data.*", "evaluation", "evaluation.*"),
    "round": (
        "federated",
        "federated.*",
        "privacy",
        "privacy.mechanisms",
        "privacy.mechanisms.*",
        "privacy.accounting",
        "privacy.accounting.*",
    ),  # fmt: skip
    "run": ("runs", "runs.*", "privacy.audit", "privacy.audit.*"),
    "interface": ("", "cli", "commands", "commands.*", "experiments", "experiments.*"),
}
ORDER = list(LAYERS)


def _modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def layer_of(name: str) -> str:
    hits = [
        layer
        for layer, pats in LAYERS.items()
        for pat in pats
        if name == pat
        or (pat.endswith(".*") and name.startswith(pat[:-1]))
        or (pat.endswith("_*") and name.startswith(pat[:-1]))
    ]
    assert hits, f"module {name!r} has no layer: add it to LAYERS (and to DEVELOPERS.md's module map)"
    return hits[0]


def imports() -> dict[str, set[str]]:
    """module -> the package modules it imports (names relative to the package; '' is the package)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        pkg = m if path.name == "__init__.py" else m.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        shims = {
            id(n) for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "__getattr__" for n in ast.walk(f)
        }
        for node in ast.walk(tree):
            if id(node) in shims or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".") if pkg else []
                    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                    target = ".".join(base + ([node.module] if node.module else []))
                elif (node.module or "").startswith("fedlora_jax"):
                    target = node.module[len("fedlora_jax") :].lstrip(".")
                else:
                    continue
                for a in node.names:
                    full = f"{target}.{a.name}" if target else a.name
                    graph[m].add(full if full in mods else target)
            else:
                for a in node.names:
                    if a.name == "fedlora_jax" or a.name.startswith("fedlora_jax."):
                        name = a.name[len("fedlora_jax") :].lstrip(".")
                        graph[m].add(name if name in mods else name.rpartition(".")[0])
        graph[m] = {t for t in graph[m] if t in mods and t != m}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_package_has_no_import_circle():
    found = cycles(imports())
    assert not found, f"import circles: {found}"


def test_no_import_goes_from_a_lower_layer_to_a_higher_one():
    up = [
        f"{m or '__init__'} ({layer_of(m)}) imports {t} ({layer_of(t)})"
        for m, ts in imports().items()
        for t in ts
        if ORDER.index(layer_of(t)) > ORDER.index(layer_of(m))
    ]
    assert not up, "upward imports:\n" + "\n".join(sorted(up))


def test_the_checks_can_fail():
    """The detectors see a planted circle and a planted upward import."""
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert cycles(g) == [["a", "b", "c"]]
    assert ORDER.index(layer_of("runs.runner")) > ORDER.index(layer_of("config.run_config"))
    assert layer_of("privacy.audit.round") == "run" and layer_of("privacy.mechanisms.local") == "round"


def test_no_module_is_over_300_lines():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_every_folder_is_a_package_with_a_docstring_saying_its_concept():
    for init in PACKAGE.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.split()) >= 8, f"{init.parent.name}/__init__.py: say what lives here"


def test_the_configuration_imports_no_implementation():
    g = imports()
    for m in [m for m in g if layer_of(m) == "config"]:
        assert {layer_of(t) for t in g[m]} <= {"ground", "config"}, (m, g[m])


def test_each_registry_holds_exactly_the_built_in_choices():
    """The config checks names against fedlora_jax.core.choices without importing the implementations; the
    registries must hold exactly those names (a name in one list only would be offered but fail, or
    run but be refused)."""
    from fedlora_jax.core import choices
    from fedlora_jax.federated import aggregation, algorithms
    from fedlora_jax.privacy import mechanisms as modes

    registered = {"dp.mode": modes.names(), "fl.aggregation": aggregation.names(), "fl.algorithm": algorithms.names()}
    for kind, built_in in choices.BUILT_IN.items():
        extra = set(registered[kind]) - set(built_in)  # names registered at run time (tests may add some)
        assert tuple(n for n in registered[kind] if n not in extra) == built_in, kind
        assert set(choices.names(kind)) == set(registered[kind]), kind
