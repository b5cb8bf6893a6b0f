"""fedlora_jax: differentially private federated LoRA fine-tuning of language models in JAX."""

import importlib.abc
import importlib.machinery
import sys

__version__ = "0.1.0"

# the short public API, imported on first use (importing the package loads nothing heavy)
_API = {
    "run": "fedlora_jax.runner",
    "load_config": "fedlora_jax.config",
    "RunConfig": "fedlora_jax.config",
    "load_model": "fedlora_jax.models.hub",
    "audit": "fedlora_jax.privacy.audit",
    "UserError": "fedlora_jax.errors",
}


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'fedlora_jax' has no attribute {name!r}")


class _Unimportable(importlib.abc.MetaPathFinder):
    """Refuses to import the modules a caller blocked with `sys.modules[name] = None`."""

    def __init__(self, names):
        self.names = frozenset(names)

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        raise ModuleNotFoundError(f"import of {spec.name} halted (blocked by the caller)", name=spec.name)

    def exec_module(self, module):  # never reached: create_module refuses
        raise ModuleNotFoundError(module.__name__)


def _keep_blocked_modules_blocked() -> None:
    """`sys.modules["torch"] = None` (the usual way to forbid `import torch`) crashes scipy's array
    API helpers, which dp-accounting imports: they look the entry up and take its `Tensor`. Each
    such entry becomes a finder that refuses the import instead: `import torch` still fails, and
    nothing finds a None module."""
    blocked = [name for name, module in list(sys.modules.items()) if module is None]
    if blocked:
        for name in blocked:
            del sys.modules[name]
        sys.meta_path.insert(0, _Unimportable(blocked))


_keep_blocked_modules_blocked()
