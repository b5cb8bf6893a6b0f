"""The run folder policy: create, resume, overwrite. Never deletes what this tool did not write."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from .config import RunConfig, config_diff, load_config
from .errors import UserError


def prepare_out(cfg: RunConfig, out: Path, resume: bool, overwrite: bool) -> None:
    """Check (resume) or create (fresh, overwrite) the run folder and write config.yaml."""
    if resume:
        saved = out / "config.yaml"
        if not saved.exists():
            raise UserError(f"--resume: {str(out)!r} holds no run (no config.yaml)")
        prev = load_config(str(saved))
        diff = config_diff(prev, cfg, ignore=())
        if diff:
            raise UserError(f"--resume with a changed config; keys that differ: {', '.join(diff)}")
        return
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"output folder {str(out)!r} exists and is not empty; pass --resume or --overwrite")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
