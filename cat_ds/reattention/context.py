"""`CatContext`: the side channel between the attention function and the loss.

The engine builds one per micro-batch and passes it as ``model(..., cat=ctx)``; transformers
forwards the extra keyword to every attention call. The attention function reads the batch's
sparse rows from it and writes, per selected layer, the attention mass on each row's causal
columns into ``ctx.mass[module.layer_idx]``, in the forward pass only (a second forward
overwrites, never appends). Non-reentrant activation checkpointing calls the attention function
again during backward; that call writes nothing (its result feeds nothing, and storing it would
keep the recomputed keys and graph alive until the context dies): the gradient flows through the
forward's mass, the one the loss read, and its backward recomputes the rows' scores (attention.py).

Sparse rows follow docs/DESIGN.md: ``cat_rows (R, 2)`` = (batch index, query position) sorted
by batch index then q; ``cat_col_ptr (R+1,)`` / ``cat_cols (nnz,)`` = CSR causal columns, each
``< q``. Everything derived here is O(R + nnz); nothing is T x T.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class _RowIndex:
    """Index tensors derived once per batch (per device) and shared by every layer."""

    row_b: torch.Tensor  # (R,) batch index of the row
    slot: torch.Tensor  # (R,) position of the row among its sample's rows
    q_pad: torch.Tensor  # (B, Rmax) query position per slot; padded slots hold T-1
    slot_valid: torch.Tensor  # (B, Rmax) bool
    nnz_b: torch.Tensor  # (nnz,) batch index of each causal column
    nnz_slot: torch.Tensor  # (nnz,) slot of each causal column's row
    nnz_row: torch.Tensor  # (nnz,) row index of each causal column
    seq_len: int
    cols: torch.Tensor  # (nnz,)
    r_max: int
    blocked: dict = field(default_factory=dict)  # (s0, s1) -> (B, s, T) bool: key not allowed for the slot

    def blocked_keys(self, s0: int, s1: int, key_valid: torch.Tensor | None) -> torch.Tensor:
        """Keys a slot may not attend to (k > q, or padding); shared by every layer of the step."""
        if (s0, s1) not in self.blocked:
            k_pos = torch.arange(self.seq_len, device=self.q_pad.device)
            allowed = k_pos[None, None, :] <= self.q_pad[:, s0:s1, None]
            if key_valid is not None:
                allowed = allowed & key_valid[:, None, :]
            self.blocked[(s0, s1)] = ~(allowed | ~self.slot_valid[:, s0:s1, None])  # padded slots: discarded
        return self.blocked[(s0, s1)]


@dataclass
class CatContext:
    """Per-micro-batch CAT state. Build with `CatContext(...)` or `CatContext.from_batch(...)`.

    layers: sorted layer indices whose attention enters the loss.
    heads: ``{layer_idx: LongTensor of head indices}``; a missing layer or ``None`` = all heads.
    key_padding_mask: optional ``(B, T)`` attention mask (1 = real token); padded keys are
        excluded from the softmax as the eager reference does (needed only for left padding).
    chunk_elems: upper bound on scores elements (slots x heads x T x B) computed at once.
    """

    cat_rows: torch.Tensor
    cat_col_ptr: torch.Tensor
    cat_cols: torch.Tensor
    layers: list[int]
    num_heads: int
    heads: dict[int, torch.Tensor | None] = field(default_factory=dict)
    key_padding_mask: torch.Tensor | None = None
    chunk_elems: int = 1 << 25
    mass: dict[int, torch.Tensor] = field(default_factory=dict)
    _index: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        rows, ptr, cols = self.cat_rows, self.cat_col_ptr, self.cat_cols
        if rows.dim() != 2 or rows.shape[1] != 2:
            raise ValueError(f"cat_rows must have shape (R, 2), got {tuple(rows.shape)}")
        if ptr.shape != (rows.shape[0] + 1,):
            raise ValueError(f"cat_col_ptr must have shape (R+1,)={rows.shape[0] + 1}, got {tuple(ptr.shape)}")
        if cols.dim() != 1 or (ptr.numel() and int(ptr[-1]) != cols.numel()):
            raise ValueError(f"cat_col_ptr[-1] must equal len(cat_cols)={cols.numel()}")
        self.layers = sorted(int(i) for i in self.layers)

    @classmethod
    def from_batch(cls, batch: dict, *, layers, heads=None, num_heads: int, **kw) -> "CatContext":
        """Take the sparse tensors (and attention_mask) out of a DESIGN.md batch dict."""
        return cls(batch["cat_rows"], batch["cat_col_ptr"], batch["cat_cols"], layers=layers, heads=heads or {},
                   num_heads=num_heads, key_padding_mask=batch.get("attention_mask"), **kw)

    @property
    def num_rows(self) -> int:
        return int(self.cat_rows.shape[0])

    def heads_for(self, layer_idx: int) -> torch.Tensor | None:
        return self.heads.get(layer_idx)

    def num_heads_for(self, layer_idx: int) -> int:
        h = self.heads_for(layer_idx)
        return self.num_heads if h is None else int(h.numel())

    def col_counts(self) -> torch.Tensor:
        """|C| per row, (R,) int64."""
        return self.cat_col_ptr[1:] - self.cat_col_ptr[:-1]

    def clear(self) -> None:
        """Drop per-layer results (the engine calls this, or simply builds a new context per step)."""
        self.mass.clear()

    def row_index(self, device: torch.device, batch_size: int, seq_len: int) -> _RowIndex:
        key = (str(device), batch_size, seq_len)
        if key not in self._index:
            self._index[key] = self._build_index(device, batch_size, seq_len)
        return self._index[key]

    def _build_index(self, device, batch_size: int, seq_len: int) -> _RowIndex:
        rows = self.cat_rows.to(device)
        b, q = rows[:, 0], rows[:, 1]
        if rows.numel() and (int(b.max()) >= batch_size or int(q.max()) >= seq_len or int(q.min()) < 0):
            raise ValueError(f"cat_rows out of range for a batch of shape ({batch_size}, {seq_len})")
        counts = torch.bincount(b, minlength=batch_size)
        first = torch.cumsum(counts, 0) - counts
        slot = torch.arange(rows.shape[0], device=device) - first[b]
        r_max = int(counts.max()) if rows.numel() else 0
        q_pad = torch.full((batch_size, r_max), seq_len - 1, dtype=torch.long, device=device)
        q_pad[b, slot] = q
        slot_valid = torch.zeros((batch_size, r_max), dtype=torch.bool, device=device)
        slot_valid[b, slot] = True
        ptr = self.cat_col_ptr.to(device)
        nnz_row = torch.repeat_interleave(torch.arange(rows.shape[0], device=device), ptr[1:] - ptr[:-1])
        cols = self.cat_cols.to(device)
        if cols.numel() and bool((cols >= q[nnz_row]).any()):
            raise ValueError("cat_cols must be < the row's query position q (DESIGN.md)")
        return _RowIndex(b, slot, q_pad, slot_valid, b[nnz_row], slot[nnz_row], nnz_row, seq_len, cols, r_max)
