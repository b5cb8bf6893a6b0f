"""Import machinery the package installs when it is imported: the old module paths of wave 2 (kept
for one release, with a DeprecationWarning) and callers' `sys.modules[name] = None` blocks."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

# old module path -> its home since the package was arranged by concept (wave 3)
MOVED = {
    f"fedlora_jax.{old}": f"fedlora_jax.{new}"
    for old, new in {
        "errors": "core.errors",
        "pytypes": "core.pytypes",
        "numerics": "core.numerics",
        "choices": "core.choices",
        "randomness": "core.randomness",
        "config_sections": "config.sections",
        "config_checks": "config.checks",
        "config_yaml": "config.yaml_io",
        "lora": "adapters.lora",
        "peft_io": "adapters.peft_io",
        "client": "federated.client",
        "server": "federated.server",
        "algorithms": "federated.algorithms",
        "aggregation": "federated.aggregation",
        "sampling": "federated.sampling",
        "mesh": "federated.mesh",
        "plan": "federated.plan",
        "simulation": "federated.simulation",
        "runner": "runs.runner",
        "resume": "runs.resume",
        "loop_control": "runs.loop_control",
        "outdir": "runs.outdir",
        "runfolder": "runs.runfolder",
        "checkpoint": "runs.checkpoint",
        "artifacts": "runs.artifacts",
        "publish": "runs.publish",
        "reporting": "runs.reporting",
        "writers": "runs.writers",
        "model_card": "runs.model_card",
        "generate": "runs.generate",
        "privacy.modes": "privacy.mechanisms",
        "privacy.modes_base": "privacy.mechanisms.base",
        "privacy.modes_local": "privacy.mechanisms.local",
        "privacy.modes_central": "privacy.mechanisms.central",
        "privacy.modes_dpsgd": "privacy.mechanisms.dpsgd",
        "privacy.analysis": "privacy.mechanisms.analysis",
        "privacy.accounting_report": "privacy.accounting.report",
        "privacy.gaussian_accounting": "privacy.accounting.gaussian",
        "privacy.ledger": "privacy.accounting.ledger",
        "privacy.audit_bounds": "privacy.audit.bounds",
        "privacy.audit_canary": "privacy.audit.canary",
        "privacy.audit_games": "privacy.audit.games",
        "privacy.audit_round": "privacy.audit.round",
        "population": "experiments.populations",
    }.items()
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import fedlora_jax.lora` gives fedlora_jax.adapters.lora (the same module object) and warns."""

    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name in MOVED else None

    def create_module(self, spec):
        warnings.warn(
            f"{spec.name} moved to {MOVED[spec.name]}; the old path goes in the next release",
            DeprecationWarning,
            stacklevel=3,
        )
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):  # the module is already loaded at its new home
        pass


class _Unimportable(importlib.abc.MetaPathFinder):
    """Refuses to import the modules a caller blocked with `sys.modules[name] = None`; to
    `importlib.util.find_spec` (how transformers asks whether torch is installed) they look absent,
    as on a machine without them."""

    def __init__(self, names):
        self.names = frozenset(names)

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in self.names:
            return None
        caller = sys._getframe(2).f_code  # importlib.util.find_spec -> importlib._bootstrap._find_spec -> here
        if caller.co_name == "find_spec" and caller.co_filename.endswith("util.py"):
            return None
        return importlib.machinery.ModuleSpec(name, self)

    def create_module(self, spec):
        raise ModuleNotFoundError(f"import of {spec.name} halted (blocked by the caller)", name=spec.name)

    def exec_module(self, module):  # never reached: create_module refuses
        raise ModuleNotFoundError(module.__name__)


def install() -> None:
    """The moved paths' finder, and `sys.modules["torch"] = None` (the usual way to forbid `import
    torch`) turned into a finder that refuses the import: scipy's array API helpers, which
    dp-accounting imports, look such an entry up and crash on None."""
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.append(_MovedModules())
    blocked = [name for name, module in list(sys.modules.items()) if module is None]
    if blocked:
        for name in blocked:
            del sys.modules[name]
        sys.meta_path.insert(0, _Unimportable(blocked))
