"""Dynamic right-padding collate with the causal mask in flat sparse (CSR) form.

Batch layout (see docs/DESIGN.md): `input_ids`, `attention_mask`, `labels` (B, T);
`cat_rows` (R, 2) = (batch index, query position), sorted; `cat_col_ptr` (R + 1,) and
`cat_cols` (nnz,) = the causal key positions of row r in cat_cols[ptr[r]:ptr[r+1]].
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from cat_ds.data.spans import TokenizedExample


def _fields(ex: TokenizedExample | Mapping[str, Any]) -> tuple[list[int], list[int], list[int], list[list[int]]]:
    if isinstance(ex, TokenizedExample):
        return ex.input_ids, ex.labels, [q for q, _ in ex.rows], [c for _, c in ex.rows]
    return ex["input_ids"], ex["labels"], ex.get("cat_q") or [], ex.get("cat_cols") or []


class CatCollator:
    """Pads to the longest sequence in the batch (optionally to a multiple, for kernels)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("CatCollator needs a pad token id (tokenizer.pad_token_id is None)")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[TokenizedExample | Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        parts = [_fields(ex) for ex in examples]
        T = max(len(ids) for ids, *_ in parts)
        if self.pad_to_multiple_of:
            T = -(-T // self.pad_to_multiple_of) * self.pad_to_multiple_of
        B = len(parts)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        labels = torch.full((B, T), -100, dtype=torch.long)
        rows: list[tuple[int, int]] = []
        ptr = [0]
        cols: list[int] = []
        for b, (ids, lab, qs, cs) in enumerate(parts):
            n = len(ids)
            input_ids[b, :n] = torch.tensor(ids, dtype=torch.long)
            attention_mask[b, :n] = 1
            labels[b, :n] = torch.tensor(lab, dtype=torch.long)
            for q, c in zip(qs, cs):
                rows.append((b, q))
                cols.extend(c)
                ptr.append(len(cols))
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "cat_rows": torch.tensor(rows, dtype=torch.long).reshape(-1, 2),
            "cat_col_ptr": torch.tensor(ptr, dtype=torch.long),
            "cat_cols": torch.tensor(cols, dtype=torch.long),
        }
