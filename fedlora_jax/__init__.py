"""fedlora_jax: differentially private federated LoRA fine-tuning of language models in JAX."""

__version__ = "0.1.0"

# the short public API, imported on first use (importing the package loads nothing heavy)
_API = {
    "run": "fedlora_jax.runs.runner",
    "load_config": "fedlora_jax.config.run_config",
    "RunConfig": "fedlora_jax.config.run_config",
    "load_model": "fedlora_jax.models.hub",
    "audit": "fedlora_jax.privacy.audit.auditor",
    "UserError": "fedlora_jax.core.errors",
}


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'fedlora_jax' has no attribute {name!r}")


from . import _imports  # noqa: E402

_imports.install()
