"""Record sources beyond JSON/JSONL, read through `datasets`: parquet and CSV files, a directory
written by `save_to_disk`, and a hub dataset as `org/name:split`. Each row becomes the same dict a
JSONL line would, and errors name the file and the row (CSV: its line, counting the header).

A CSV or parquet `important` column may hold the annotation as JSON text; it is decoded here.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

TABULAR = {".parquet": "parquet", ".csv": "csv"}
HUB_SPLIT = re.compile(r"^[\w.-]+/[\w.-]+:[\w.\-\[\]%:]+$")  # org/name:split (split slicing allowed)


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_info.json", "dataset_dict.json"))


def is_hub_split(spec: str) -> bool:
    return bool(HUB_SPLIT.match(spec)) and not Path(spec).exists()


def is_table(src: Path | str) -> bool:
    return isinstance(src, str) or Path(src).suffix in TABULAR or is_saved_dataset(Path(src))


def _load(src: Path | str):
    import datasets

    if isinstance(src, str):  # a hub dataset
        name, split = src.split(":", 1)
        try:
            return datasets.load_dataset(name, split=split)
        except Exception as e:  # offline, no such dataset or split
            raise FileNotFoundError(
                f"{src}: the hub could not serve dataset {name!r} split {split!r} ({type(e).__name__}); offline, "
                "use local files (JSONL, JSON, parquet, CSV) or a directory written by save_to_disk") from None
    if Path(src).is_dir():
        ds = datasets.load_from_disk(str(src))
        if isinstance(ds, datasets.DatasetDict):
            raise FileNotFoundError(f"{src}: a saved DatasetDict ({', '.join(ds)}); name one split's directory, "
                                    f"e.g. {Path(src) / next(iter(ds))}")
        return ds
    return datasets.load_dataset(TABULAR[Path(src).suffix], data_files=str(src), split="train")


def iter_rows(src: Path | str) -> Iterator[tuple[str, Any]]:
    """("<source>: row i: " or "<file>:<line>: " for CSV, row dict) for every row."""
    ds = _load(src)
    name = src if isinstance(src, str) else Path(src).name
    csv = not isinstance(src, str) and Path(src).suffix == ".csv"
    for i, row in enumerate(ds):
        yield (f"{name}:{i + 2}: " if csv else f"{name}: row {i}: "), row


def decode_important(row: Any) -> Any:
    """A table's `important` cell holding JSON text (after column mapping) -> the annotation."""
    imp = row.get("important") if isinstance(row, dict) else None
    if isinstance(imp, str) and imp.strip()[:1] in ("[", "{"):
        try:
            return {**row, "important": json.loads(imp)}
        except json.JSONDecodeError as e:
            raise ValueError(f"important: invalid JSON: {e.msg}") from None
    return row
