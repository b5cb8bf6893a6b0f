"""The privacy audit: canary games played through the real round (round.py, games.py, canary.py),
lower bounds on epsilon (bounds.py), and the auditor that runs them and gives a verdict
(auditor.py). `from fedlora_jax.privacy.audit import audit` is the short path (loaded on use)."""


def __getattr__(name: str):
    if name == "audit":
        from .auditor import audit

        return audit
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
