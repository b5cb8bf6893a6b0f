"""Load instruction examples into a `datasets.Dataset` with columns instruction, input, output
(+ a label column when one is used for partitioning)."""

from __future__ import annotations

from ..errors import UserError
import importlib.util
from pathlib import Path

import datasets

from . import synthetic

STANDARD = ("instruction", "input", "output")
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


def load_examples(source: str, *, split: str = "train", columns: dict | None = None,
                  label_column: str | None = None, synthetic_tasks=synthetic.TASKS,
                  synthetic_examples: int = 2000, max_examples: int | None = None, seed: int = 0):
    """A Dataset with instruction/input/output (input may be empty) and, when given, the label
    column. `columns` maps our names to the dataset's (e.g. Dolly: instruction->instruction,
    input->context, output->response; Q/A: instruction->question, output->answer)."""
    if source == "chatterbot":
        ds = datasets.Dataset.from_list(chatterbot_examples())
    elif source == "synthetic":
        ds = datasets.Dataset.from_list(synthetic.generate(synthetic_examples, tuple(synthetic_tasks), seed))
    elif Path(source).suffix in LOCAL_FORMATS:
        if not Path(source).exists():
            raise UserError(f"data file {source!r} does not exist")
        ds = datasets.load_dataset(LOCAL_FORMATS[Path(source).suffix], data_files=source, split="train")
    elif Path(source).exists():
        raise UserError(f"data source {source!r} is a path but not a .json/.jsonl/.csv/.parquet file")
    else:
        try:
            ds = datasets.load_dataset(source, split=split)
        except Exception as e:
            raise UserError(f"could not load dataset {source!r} (split {split!r}) from the Hugging Face hub "
                             f"({type(e).__name__}); if you are offline, pass a local json/jsonl/csv/parquet "
                             "file, 'chatterbot' or 'synthetic'") from e
    mapping = dict(columns or {})
    for ours in mapping:
        if ours not in STANDARD:
            raise UserError(f"data.columns key {ours!r} is not one of: {', '.join(STANDARD)}")
    found = list(ds.column_names)
    need = {ours: mapping.get(ours, ours) for ours in STANDARD}
    for ours in ("instruction", "output"):
        if need[ours] not in found:
            raise UserError(f"dataset has no column {need[ours]!r} (for {ours}); columns found: {', '.join(found)}; "
                             "map them with data.columns")
    if label_column is not None and label_column not in found:
        raise UserError(f"label column {label_column!r} not in the dataset; columns found: {', '.join(found)}")
    if len(ds) == 0:
        raise UserError(f"dataset {source!r} (split {split!r}) is empty")
    has_input = need["input"] in found

    def standard(batch):
        n = len(batch[need["instruction"]])
        out = {"instruction": [str(x or "") for x in batch[need["instruction"]]],
               "input": [str(x or "") for x in batch[need["input"]]] if has_input else [""] * n,
               "output": [str(x or "") for x in batch[need["output"]]]}
        if label_column is not None:
            out["label"] = [str(x) for x in batch[label_column]]
        return out

    ds = ds.map(standard, batched=True, remove_columns=found)
    if max_examples is not None and max_examples < len(ds):
        ds = ds.shuffle(seed=seed).select(range(max_examples))
    return ds
