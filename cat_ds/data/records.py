"""CAT records: load, validate and normalise.

A record is `{"input": str, "target": str | number, "important": ...}` plus any other
fields (kept, ignored). `important` comes in two shapes in the wild, both normalised to an
ordered list of `(key, [values])`:

    [{"High Risk": ["Smoking: 3", "Weight: 5"]}, {"k2": "v"}]   # list of objects
    {"High Risk": ["Smoking: 3"], "k2": "v"}                    # one plain object

Validation happens for the whole input before any work starts, and every error names the
file, the line and the field: `train.jsonl:17: important[2]["Answer: 3"][0]: expected a
string, got 5`.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

Important = list[tuple[str, list[str]]]


@dataclass
class CatRecord:
    input: str
    target: str
    important: Important | None  # None: no causal supervision
    extra: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # "file:line" for error messages downstream

    @property
    def text(self) -> str:
        """The training text (EOS is appended as a token by the tokenizer step)."""
        return self.input + self.target

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"input": self.input, "target": self.target}
        if self.important is not None:
            out["important"] = [{k: list(v)} for k, v in self.important]
        out.update(self.extra)
        return out


class RecordError(ValueError):
    """One or more invalid records. `errors` holds every message (one, unless collecting)."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        more = f"\n... and {len(errors) - 20} more error(s)" if len(errors) > 20 else ""
        super().__init__("\n".join(errors[:20]) + more)


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def normalize_target(value: Any, where: str) -> str:
    """A JSON number becomes Python's str() of the parsed value: 32 -> "32", 80.0 -> "80.0"."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{where}target: expected a string or a number, got {_type_name(value)}")


def normalize_important(value: Any, where: str = "") -> Important | None:
    """Both `important` shapes -> ordered [(key, [values])]; None/absent -> None."""
    if value is None:
        return None
    if isinstance(value, dict):
        items: list[tuple[str, Any, str]] = [(k, v, f'important["{k}"]') for k, v in value.items()]
    elif isinstance(value, list):
        items = []
        for i, obj in enumerate(value):
            if not isinstance(obj, dict):
                raise ValueError(f"{where}important[{i}]: expected an object, got {_type_name(obj)}")
            items.extend((k, v, f'important[{i}]["{k}"]') for k, v in obj.items())
    else:
        raise ValueError(f"{where}important: expected a list of objects or an object, got {_type_name(value)}")
    out: Important = []
    for key, vals, path in items:
        if key == "":
            raise ValueError(f"{where}{path}: empty key phrase")
        if isinstance(vals, str):
            vals = [vals]
        elif not isinstance(vals, list):
            raise ValueError(f"{where}{path}: expected a string or a list of strings, got {_type_name(vals)}")
        for j, v in enumerate(vals):
            if not isinstance(v, str):
                raise ValueError(f"{where}{path}[{j}]: expected a string, got {_type_name(v)}")
            if v == "":
                raise ValueError(f"{where}{path}[{j}]: empty value phrase")
        out.append((key, list(vals)))
    return out


def parse_record(obj: Any, where: str) -> CatRecord:
    """One decoded JSON value -> CatRecord; `where` is the "file:line: " prefix."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}expected a JSON object, got {_type_name(obj)}")
    if "input" not in obj:
        raise ValueError(f"{where}input: missing required field")
    if not isinstance(obj["input"], str):
        raise ValueError(f"{where}input: expected a string, got {_type_name(obj['input'])}")
    if "target" not in obj:
        raise ValueError(f"{where}target: missing required field")
    target = normalize_target(obj["target"], where)
    important = normalize_important(obj.get("important"), where)
    extra = {k: v for k, v in obj.items() if k not in ("input", "target", "important")}
    return CatRecord(obj["input"], target, important, extra, where.rstrip(": "))


def expand_paths(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path | str]:
    """One source, several, or glob patterns -> existing files (JSONL, JSON, parquet, CSV) and saved
    dataset directories as Paths, hub datasets (`org/name:split`) as strings, in the given order."""
    from cat_ds.data.tables import is_hub_split, is_saved_dataset

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path | str] = []
    for p in paths:
        p = str(p)
        if not glob.has_magic(p) and is_hub_split(p):
            out.append(p)
            continue
        matches = sorted(glob.glob(p)) if glob.has_magic(p) else [p]
        if not matches:
            raise FileNotFoundError(f"{p}: no file matches this pattern")
        for m in matches:
            if Path(m).is_dir() and not is_saved_dataset(Path(m)):
                raise FileNotFoundError(f"{m}: a directory, but not a dataset written by save_to_disk")
            if not Path(m).exists():
                raise FileNotFoundError(f"{m}: no such file")
            out.append(Path(m))
    return out


def _iter_json_values(path: Path, text: str) -> Iterator[tuple[int, Any | Exception]]:
    """(line number, decoded value or the decode error) for JSONL or a JSON array file's text."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            yield e.lineno, ValueError(f"invalid JSON: {e.msg} (column {e.colno})")
            return
        # Line numbers of array elements: find where each element starts via raw_decode.
        dec = json.JSONDecoder()
        pos = text.index("[") + 1
        for v in values:
            while text[pos] in " \t\r\n,":
                pos += 1
            _, end = dec.raw_decode(text, pos)
            yield text.count("\n", 0, pos) + 1, v
            pos = end
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, ValueError(f"invalid JSON: {e.msg} (column {e.colno})")


def _rows(src: Path | str) -> Iterator[tuple[str, Any, bool]]:
    """(where, value, from a table) per row of one source."""
    from cat_ds.data.tables import is_table, iter_rows

    if is_table(src):
        for where, row in iter_rows(src):
            yield where, row, True
    else:
        from cat_ds.config import ConfigError, read_text

        try:
            text = read_text(Path(src), "file")
        except ConfigError as e:  # one error for the file; the other sources still report theirs
            yield "", ValueError(str(e)), False
            return
        for lineno, value in _iter_json_values(Path(src), text):
            yield f"{Path(src).name}:{lineno}: ", value, False


def rename_columns(row: Any, columns: dict[str, str] | None, where: str) -> Any:
    """`data.columns` ({input: question, target: answer, important: causal}): a source's own column
    names mapped onto the record fields (other columns are kept as they are)."""
    if not columns or not isinstance(row, dict):
        return row
    out = {k: v for k, v in row.items() if k not in columns.values()}
    for field_name, col in columns.items():
        if col in row:
            out[field_name] = row[col]
        elif field_name in ("input", "target"):
            raise ValueError(f"{where}{col}: missing column (data.columns maps it to {field_name})")
    return out


def load_records(paths, collect_errors: bool = False, columns: dict[str, str] | None = None) -> list[CatRecord]:
    """Load and validate every record of every source (see `expand_paths`); raise RecordError before
    returning anything if any record is bad (first error, or all of them with `collect_errors`)."""
    records: list[CatRecord] = []
    errors: list[str] = []
    for src in expand_paths(paths):
        for where, value, table in _rows(src):
            try:
                if isinstance(value, Exception):
                    raise ValueError(f"{where}{value}")
                value = rename_columns(value, columns, where)
                if table:
                    from cat_ds.data.tables import decode_important

                    try:
                        value = decode_important(value)
                    except ValueError as e:
                        raise ValueError(f"{where}{e}") from None
                records.append(parse_record(value, where))
            except ValueError as e:
                errors.append(str(e))
                if not collect_errors:
                    raise RecordError(errors) from None
    if errors:
        raise RecordError(errors)
    return records


def write_jsonl(records: Iterable[CatRecord | dict], path: str | os.PathLike) -> None:
    """Deterministic JSONL (same records, byte-identical file)."""
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            obj = r.to_json() if isinstance(r, CatRecord) else r
            fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
