"""The one reader of a run folder's files (metrics.jsonl, summary.json, config.yaml, the
checkpoints' metadata, the manifest): `read_json`, `read_rows`, `check_config_file` and
`damaged(...)`. A parse error, a wrong type or an empty file is one sentence, "run folder damaged:
FILE: what; what can be done". Also `os_error_of`, the OSError that a library's error hides."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..core.errors import UserError

TODO_OVERWRITE = "start it again with --overwrite or choose another --out"


def damaged(path: str | os.PathLike, what: str, todo: str = TODO_OVERWRITE) -> UserError:
    """The one error of a run folder file that cannot be used."""
    return UserError(f"run folder damaged: {str(path)!r}: {what}; {todo}")


def _read_bytes(path: Path, todo: str) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise damaged(path, "the file is missing", todo) from None
    except IsADirectoryError:
        raise damaged(path, "a folder stands where the file should be", todo) from None
    except OSError as e:
        raise UserError(f"cannot read {str(path)!r}: {e.strerror or e}") from None
    if not raw.strip():
        raise damaged(path, f"the file is empty ({len(raw)} bytes)", todo)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise damaged(path, f"not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})", todo) from None


def read_json(path: str | os.PathLike, kind: type = dict, todo: str = TODO_OVERWRITE):
    """A JSON file of a run folder, of type `kind`, or `damaged`."""
    path = Path(path)
    text = _read_bytes(path, todo)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise damaged(path, f"not JSON (line {e.lineno}, column {e.colno}: {e.msg})", todo) from None
    except RecursionError:
        raise damaged(path, "JSON nested too deeply", todo) from None
    if not isinstance(data, kind):
        raise damaged(path, f"holds a JSON {_json_type(data)}, not a {_json_type(kind())}", todo)
    return data


def _json_type(x) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(x), "number")


ROWS_TODO = "resume needs its rows up to the last checkpoint; restore the file or " + TODO_OVERWRITE


def read_rows(path: str | os.PathLike, upto: int) -> list[dict]:
    """metrics.jsonl's rows of rounds <= upto (every round 1..upto must be there). A truncated last
    line (a kill while it was written) is skipped: that round reruns."""
    path = Path(path)
    if upto <= 0 and (not path.exists() or path.stat().st_size == 0):
        return []
    lines = _read_bytes(path, ROWS_TODO).splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            if i == len(lines):
                break  # the round that was being written when the run stopped; it reruns
            raise damaged(path, f"line {i} is not JSON", ROWS_TODO) from None
        if not isinstance(row, dict):
            raise damaged(path, f"line {i} is a JSON {_json_type(row)}, not a row object", ROWS_TODO)
        r = row.get("round")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise damaged(path, f"line {i} has no round number (got {r!r})", ROWS_TODO)
        rows.append(row)
    rows = [r for r in rows if r["round"] <= upto]
    have = sorted({r["round"] for r in rows})
    if have != list(range(1, upto + 1)):
        missing = sorted(set(range(1, upto + 1)) - set(have))
        what = f"no row for round {missing[0]}" if missing else "a round is logged twice"
        raise damaged(path, f"{what} (the last checkpoint is after round {upto})", ROWS_TODO)
    return rows


def check_config_file(path: str | os.PathLike) -> None:
    """A run folder's config.yaml is a non-empty YAML mapping that loads as a config, or `damaged`."""
    from ..config.run_config import load_config

    path = Path(path)
    todo = "restore it (it must equal the run's config) or " + TODO_OVERWRITE
    _read_bytes(path, todo)
    try:
        load_config(str(path))
    except UserError as e:
        raise damaged(path, str(e), todo) from None


# ----------------------------------------------------------------------------- errors that hide an OSError

_OS_CODE = re.compile(r"os_error_code='?(\d+)|\(os error (\d+)\)|\[Errno (\d+)\]")


def os_error_of(e: BaseException, where: str | os.PathLike | None = None) -> OSError | None:
    """The OSError behind an exception of a library that wraps it (orbax and tensorstore raise
    ValueError "... [os_error_code='28']", safetensors "... (os error 28)"), else None."""
    seen = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno is not None:
            return x
        m = _OS_CODE.search(str(x))
        if m:
            code = int(next(g for g in m.groups() if g))
            path = re.search(r'(?:file|writing:?)\s+"([^"]+)"', str(x))
            named = path.group(1) if path and os.path.isabs(path.group(1)) else None  # not a tensor's key
            return OSError(code, os.strerror(code), named or (str(where) if where else None))
        x = x.__cause__ or x.__context__
    return None
