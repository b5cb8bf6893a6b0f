"""The run folder policy: create, resume, overwrite. Never deletes what this tool did not write.

- fresh: the folder must not exist or be empty.
- `overwrite`: replaces only a run folder of this tool: one with its manifest (runfolder.MANIFEST),
  which lists every file and folder the run wrote, by relative path and size. Anything else in the
  folder, at any depth, or a listed file that changed, is refused before anything is deleted; the old
  run is deleted (exactly what its manifest lists) only once the new folder is made.
- `resume`: the folder holds a run (config.yaml, the manifest) with at least one checkpoint, and
  the same config.
- an output path that cannot be written (read-only, under a file, a full disk) is a UserError
  naming the path and the reason, and leaves what was there as it was.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..config.run_config import RunConfig, config_diff, load_config
from ..core.errors import UserError
from .reading import check_config_file
from .runfolder import MANIFEST, Manifest

log = logging.getLogger("fedlora_jax")


def _q(p: Path) -> str:
    return repr(str(p))


def _has_checkpoint(out: Path) -> bool:
    folder = out / "checkpoints"
    return folder.is_dir() and any(p.is_dir() and p.name.isdigit() for p in folder.iterdir())


def _has_rows(out: Path) -> bool:
    """Whether the run logged (released) any round: a run killed before that restarts from round 0."""
    m = out / "metrics.jsonl"
    return m.is_file() and m.stat().st_size > 0


def is_run_folder(out: Path) -> bool:
    """Whether `out` holds a run of this tool: its config.yaml and the manifest of what it wrote."""
    return (Path(out) / "config.yaml").is_file() and (Path(out) / MANIFEST).is_file()


def _existing_ancestor(p: Path) -> Path:
    p = Path(os.path.abspath(p))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_out(out: str | os.PathLike, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse (UserError) what prepare_out would refuse, without writing anything: called by the
    CLI before it loads a model, and again by prepare_out."""
    if isinstance(out, str) and not out.strip():
        raise UserError("--out is empty; pass the run folder (or leave --out out for runs/NAME)")
    out = Path(out)
    if resume and overwrite:
        raise UserError(
            "--resume and --overwrite exclude each other: resume continues the run in the folder, overwrite replaces it"
        )
    try:
        _check(out, resume, overwrite)
    except OSError as e:  # e.g. a name too long for the file system
        raise UserError(f"output folder {_q(out)} cannot be used: {e.strerror or e}") from None


def _check(out: Path, resume: bool, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"output folder {_q(out)} is a file; pass a folder to --out")
    if not out.exists():
        if resume:
            raise UserError(f"--resume: {_q(out)} does not exist; there is no run to resume")
        anc = _existing_ancestor(out)
        if not anc.is_dir():
            raise UserError(f"output folder {_q(out)} cannot be made: {_q(anc)} is a file, not a folder")
        if not os.access(anc, os.W_OK | os.X_OK):
            raise UserError(
                f"output folder {_q(out)} cannot be made: {_q(anc)} is not writable (read-only or not yours)"
            )
        return
    if resume:
        if not (out / "config.yaml").is_file():
            raise UserError(f"--resume: {_q(out)} holds no run (no config.yaml)")
        if not (out / MANIFEST).is_file():
            raise UserError(
                f"--resume: {_q(out)} holds no run of this tool (no {MANIFEST}, the list of what a run "
                "wrote), so nothing is written there; choose another --out"
            )
        Manifest.load(out)  # a damaged manifest: say so
        check_config_file(out / "config.yaml")
        if not _has_checkpoint(out) and _has_rows(out):
            raise UserError(
                f"--resume: the run in {_q(out)} has no checkpoint yet (checkpoint_every rounds); "
                "start it again with --overwrite"
            )
        if not os.access(out, os.W_OK | os.X_OK):
            raise UserError(f"--resume: run folder {_q(out)} is not writable (read-only or not yours)")
        return
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        if not os.access(out, os.W_OK | os.X_OK):
            raise UserError(f"output folder {_q(out)} is not writable (read-only or not yours)")
        return
    if not overwrite:
        raise UserError(f"output folder {_q(out)} exists and is not empty; pass --resume or --overwrite")
    if out.is_symlink():
        raise UserError(f"--overwrite: {_q(out)} is a symbolic link; pass the run folder itself")
    here = Path.cwd().resolve()
    if out.resolve() == here or out.resolve() in here.parents:
        raise UserError(
            f"--overwrite would delete {_q(out)}, which holds the current directory; pass a run folder to --out"
        )
    if not (out / MANIFEST).is_file():
        raise UserError(
            f"--overwrite replaces only a run folder this tool wrote (it lists its files in {MANIFEST}); "
            f"{_q(out)} has no {MANIFEST}, so nothing was deleted; choose another --out"
        )
    problems = Manifest.load(out).problems()
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(
            f"--overwrite: run folder {_q(out)} also holds {problems[0]}{more}, so nothing was deleted; "
            "move it away or choose another --out"
        )
    if not os.access(out.resolve().parent, os.W_OK | os.X_OK):
        raise UserError(f"--overwrite: the folder holding {_q(out)} is not writable (read-only or not yours)")


def check_same_config(cfg: RunConfig, out: str | os.PathLike) -> None:
    """--resume: the run folder's config.yaml (check_out made sure it loads) equals `cfg`."""
    diff = config_diff(load_config(str(Path(out) / "config.yaml")), cfg, ignore=())
    if diff:
        raise UserError(f"--resume with a changed config; keys that differ: {', '.join(diff)}")


def prepare_out(cfg: RunConfig, out: Path, resume: bool, overwrite: bool) -> None:
    """Check (resume) or create (fresh, overwrite) the run folder and write config.yaml."""
    out = Path(out)
    check_out(out, resume, overwrite)
    if resume:
        check_same_config(cfg, out)
        return
    text = cfg.to_yaml()
    old = None
    if out.exists() and any(out.iterdir()):  # an old run (check_out made sure): move it aside first
        old = out.with_name(f".{out.name}.overwritten-{os.getpid()}")
        try:
            out.rename(old)
        except OSError as e:
            raise UserError(f"--overwrite: cannot replace {_q(out)}: {e.strerror or e}") from None
    made = []  # folders this call creates, outermost first
    p = Path(os.path.abspath(out))
    while not p.exists():
        made.insert(0, p)
        p = p.parent
    try:
        for d in made:
            d.mkdir()
        (out / "config.yaml").write_text(text)
        Manifest.create(out, "config.yaml")
    except OSError as e:
        # leave everything as it was: remove what this call made, put the old run back
        if out.is_dir():
            for name in ("config.yaml", MANIFEST, MANIFEST + ".tmp"):
                (out / name).unlink(missing_ok=True)
        for d in reversed(made):
            try:
                d.rmdir()
            except OSError:
                break
        if old is not None:
            old.rename(out)
        where = e.filename or out
        raise UserError(f"cannot write the run folder {_q(out)}: {where}: {e.strerror or e}") from None
    if old is not None:  # exactly what the old run's manifest lists (check_out refused anything else)
        left = Manifest.load(old).delete()
        if left:
            log.warning(
                "--overwrite: %s kept in %s: it appeared in the old run folder after the check (not the tool's)",
                left[0],
                old,
            )
        else:
            old.rmdir()
