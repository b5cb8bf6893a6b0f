"""Load examples into a `datasets.Dataset`: instruction rows with columns instruction, input,
output, or conversations in a `messages` column (lists of {role, content}); + a label column when
one is used for partitioning.

Conversations are recognized without configuration when the rows hold a `messages` column, or
ShareGPT's `conversations` column ({from, value} turns, from: system/human/gpt), and no instruction
column; `data.columns: {messages: NAME}` names another column.

Local json/jsonl/csv/parquet files are read here (not through `datasets`' builders), so that a
bad file is reported as one sentence naming the file, the line and what is wrong.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

import datasets

from ..core import randomness
from ..core.errors import UserError
from . import synthetic
from .chat import json_type, normalize_conversation  # noqa: F401  (json_type re-exported)

if TYPE_CHECKING:
    from collections.abc import Sequence

STANDARD = ("instruction", "input", "output")
COLUMN_KEYS = (*STANDARD, "messages")  # what data.columns may map
CONVERSATION_COLUMNS = ("messages", "conversations")  # recognized without data.columns
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def chatterbot_examples() -> list[dict]:
    """English chatterbot-corpus: consecutive (question, answer) turns, topic = file name."""
    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the offline chatterbot data needs: pip install --no-deps chatterbot-corpus==1.3.3")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "english"
    rows = []
    for f in sorted(folder.glob("*.yml")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conv if t is not None]
            for q, a in zip(turns[:-1:2], turns[1::2]):
                if q and a:
                    rows.append({"instruction": q, "input": "", "output": a, "topic": f.stem})
    return rows


# ----------------------------------------------------------------------------- local files


def read_text(path: str | Path, what: str = "data file") -> str:
    """A file's UTF-8 text (a BOM is dropped); a UserError naming the file if it cannot be read,
    is not UTF-8 or is empty."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} {str(path)!r} does not exist")
    if not path.is_file():
        raise UserError(f"{what} {str(path)!r} is not a file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {what} {str(path)!r}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{what} {str(path)!r} is not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); save it as UTF-8"
        ) from None
    if not text.strip():
        raise UserError(f"{what} {str(path)!r} is empty")
    return text


def _json_rows(text: str, path: str, what: str, lines: bool) -> list:
    if not lines:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # several values: JSON lines in a .json file
                raise UserError(
                    f"{what} {path!r} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
                ) from None
        else:
            if not isinstance(doc, list):
                raise UserError(
                    f"{what} {path!r} must hold a JSON array of objects (or one object per line), "
                    f"got a JSON {json_type(doc)}"
                )
            return doc
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise UserError(
                f"{what} {path!r} line {i} is not valid JSON ({e.msg}, column {e.colno}); "
                "a .jsonl file holds one JSON object per line"
            ) from None
    return rows


def _csv_rows(text: str, path: str, what: str) -> list[dict]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        table = list(reader)
    except csv.Error as e:
        raise UserError(f"{what} {path!r} is not valid CSV (line {reader.line_num}: {e})") from None
    header, rows = table[0], []
    if len(set(header)) < len(header):
        dup = next(h for h in header if header.count(h) > 1)
        raise UserError(f"{what} {path!r} has the column {dup!r} twice in its header")
    for i, r in enumerate(table[1:], 2):
        if not r:
            continue
        if len(r) != len(header):
            raise UserError(f"{what} {path!r} row {i} has {len(r)} fields but the header has {len(header)}")
        rows.append(dict(zip(header, r)))
    return rows


def read_rows(path: str | Path, what: str = "data file") -> list[dict]:
    """The rows (dicts) of a local .json (array or JSON lines), .jsonl, .csv or .parquet file."""
    path = Path(path)
    suffix, name = path.suffix, str(path)
    if suffix not in LOCAL_FORMATS:
        raise UserError(f"{what} {name!r} is not a .json/.jsonl/.csv/.parquet file")
    if suffix == ".parquet":
        if not path.is_file():
            read_text(path, what)  # raises: missing or a folder
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise UserError(
                f"{what} {name!r} is not a readable Parquet file ({' '.join(str(e).split()).split('. ')[0]})"
            ) from None
    else:
        text = read_text(path, what)
        rows = _csv_rows(text, name, what) if suffix == ".csv" else _json_rows(text, name, what, suffix == ".jsonl")
    for i, r in enumerate(rows, 1):
        if not isinstance(r, dict):
            raise UserError(f"{what} {name!r} record {i} is a JSON {json_type(r)}, not an object with named fields")
    if not rows:
        raise UserError(f"{what} {name!r} holds no records")
    return rows


# ----------------------------------------------------------------------------- examples


def load_examples(
    source: str,
    *,
    split: str = "train",
    columns: dict | None = None,
    label_column: str | None = None,
    synthetic_tasks: Sequence[str] = synthetic.TASKS,
    synthetic_examples: int = 2000,
    max_examples: int | None = None,
    seed: int = 0,
) -> datasets.Dataset:
    """A Dataset with instruction/input/output (input may be empty), or with `messages`
    (conversations as [{role, content}]), and, when given, the label column. `columns` maps our
    names to the dataset's (e.g. Dolly: instruction->instruction, input->context,
    output->response; Q/A: instruction->question, output->answer; ShareGPT: messages->conversations)."""
    mapping = dict(columns or {})
    for ours in mapping:
        if ours not in COLUMN_KEYS:
            raise UserError(f"data.columns key {ours!r} is not one of: {', '.join(COLUMN_KEYS)}")
    if "messages" in mapping and any(k in mapping for k in STANDARD):
        raise UserError(
            "data.columns maps both messages and instruction/input/output; a dataset is either "
            "conversations or instruction rows"
        )
    if source == "chatterbot":
        rows, where = chatterbot_examples(), "the chatterbot data"
    elif source == "synthetic":
        rows, where = synthetic.generate(synthetic_examples, tuple(synthetic_tasks), seed), "the synthetic data"
    elif Path(source).suffix in LOCAL_FORMATS:
        rows, where = read_rows(source), f"data file {source!r}"
    elif Path(source).exists():
        raise UserError(f"data source {source!r} is a path but not a .json/.jsonl/.csv/.parquet file")
    else:
        try:
            ds = datasets.load_dataset(source, split=split)
        except Exception as e:
            raise UserError(
                f"could not load dataset {source!r} (split {split!r}) from the Hugging Face hub "
                f"({type(e).__name__}); if you are offline, pass a local json/jsonl/csv/parquet "
                "file, 'chatterbot' or 'synthetic'"
            ) from e
        rows, where = ds.to_list(), f"dataset {source!r} (split {split!r})"
    if not rows:
        raise UserError(f"{where} is empty")
    found = list(dict.fromkeys(k for r in rows for k in r))
    conversations = mapping.get("messages")
    if conversations is None and not mapping and "instruction" not in found:
        conversations = next((c for c in CONVERSATION_COLUMNS if c in found), None)
    if conversations is not None:
        return _conversations(rows, where, conversations, found, label_column, max_examples, seed)
    need = {ours: mapping.get(ours, ours) for ours in STANDARD}
    for ours in ("instruction", "output"):
        if need[ours] not in found:
            raise UserError(
                f"{where} has no column {need[ours]!r} (for {ours}); columns found: "
                f"{', '.join(map(str, found))}; map them with data.columns"
            )
    if label_column is not None and label_column not in found:
        raise UserError(f"label column {label_column!r} not in {where}; columns found: {', '.join(map(str, found))}")
    has_input = need["input"] in found
    out = []
    for i, r in enumerate(rows, 1):
        ex = {}
        for ours in STANDARD:
            v = r.get(need[ours]) if ours != "input" or has_input else ""
            if v is None and ours == "input":
                v = ""
            if not isinstance(v, str):
                got = "nothing" if v is None else f"{v!r} (a {json_type(v)})"
                raise UserError(
                    f"{where} record {i}: column {need[ours]!r} ({ours}) holds {got}; "
                    "instruction, input and output must be text"
                )
            ex[ours] = v
        if label_column is not None:
            ex["label"] = _label(r, label_column, where, i)
        out.append(ex)
    return _dataset(out, max_examples, seed)


def _dataset(out: list[dict], max_examples: int | None, seed: int):
    ds = datasets.Dataset.from_list(out)
    if max_examples is not None and max_examples < len(ds):
        ds = ds.shuffle(seed=randomness.np_seed(seed, "subsample")).select(range(max_examples))
    return ds


def _label(r: dict, label_column: str, where: str, i: int) -> str:
    v = r.get(label_column)
    if v is None:  # str(None) would make a client of the unlabelled records, named "None"
        raise UserError(
            f"{where} record {i}: label column {label_column!r} is missing or null; give every record a label "
            "(the partition groups clients by it) or drop the unlabelled records"
        )
    if isinstance(v, (list, dict)):
        raise UserError(
            f"{where} record {i}: label column {label_column!r} holds {v!r}; a label must be a single value"
        )
    return str(v)


def _conversations(rows, where, column, found, label_column, max_examples, seed):
    """A Dataset with a `messages` column of normalized conversations (+ label)."""
    if column not in found:
        raise UserError(
            f"{where} has no column {column!r} (for messages); columns found: {', '.join(map(str, found))}; "
            "map them with data.columns"
        )
    if label_column is not None and label_column not in found:
        raise UserError(f"label column {label_column!r} not in {where}; columns found: {', '.join(map(str, found))}")
    out = []
    for i, r in enumerate(rows, 1):
        ex = {"messages": normalize_conversation(r.get(column), f"{where} record {i}: column {column!r}")}
        if label_column is not None:
            ex["label"] = _label(r, label_column, where, i)
        out.append(ex)
    return _dataset(out, max_examples, seed)
