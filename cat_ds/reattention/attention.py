"""The "cat_sdpa" attention function: fast-kernel output + exact sparse attention mass on C.

Registered with transformers' `AttentionInterface` (and a matching mask function with
`AttentionMaskInterface`) under the name ``cat_sdpa``; select it with
``model.set_attn_implementation("cat_sdpa")``.

Output: flash-attn 2 when installed, on CUDA, in fp16/bf16 and no mask is needed; else
`torch.nn.functional.scaled_dot_product_attention`. `is_causal` is used only when
q_len == k_len and transformers passed no mask; with a KV cache (generate) the mask transformers
passes is used, or for q_len == 1 none at all (SDPA's `is_causal` aligns top-left: wrong there).

CAT side: when the call carries ``cat=CatContext`` with supervised rows and this layer is
selected, recompute the scores of the supervised rows of the selected heads against their keys
k <= q: per sample one batched matmul (B, h, Rmax, D) x (B, h, D, T) -> (B, h, Rmax, T), chunked
over rows, logsumexp over the allowed keys, and the probability mass on the row's causal columns
C = sum_{k in C} exp(score - lse), in float32 for half inputs. Memory O(rows x heads x T); never
T x T, and nothing of that size is kept for backward: a custom autograd function saves only the
query and key (which the kernel saves anyway) and its backward recomputes the rows' scores.
The result OVERWRITES ``ctx.mass[layer_idx]`` in the forward pass; a checkpoint recomputation
in backward writes nothing (see context.py).
Attention dropout is not applied to the mass (the Llama/Qwen2 default dropout is 0).
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from .context import CatContext

NAME = "cat_sdpa"
_FLASH = None  # flash_attn_func once load_flash() imported it, or a str: why it is not usable


def load_flash():
    """Import flash-attn once: its `flash_attn_func`, or a str saying why not (SDPA runs instead).
    The engine calls it when it builds the model, so a broken install shows before the first step."""
    global _FLASH
    if _FLASH is None:
        if importlib.util.find_spec("flash_attn") is None:
            _FLASH = "flash-attn is not installed"
        else:
            try:
                from flash_attn import flash_attn_func  # handles GQA natively

                _FLASH = flash_attn_func
            except Exception as e:  # ImportError, or undefined symbols: built against another torch/CUDA
                _FLASH = f"flash-attn does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return _FLASH


def _flash_usable(query: torch.Tensor) -> bool:
    return (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] <= 256
            and callable(load_flash()))


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def attention_output(query, key, value, attention_mask, dropout: float, scaling: float) -> torch.Tensor:
    """Layer output (B, S, H, D) for query (B, H, S, D) and key/value (B, Hkv, K, D)."""
    q_len, k_len = query.shape[2], key.shape[2]
    n_rep = query.shape[1] // key.shape[1]
    if attention_mask is None and q_len == k_len and _flash_usable(query):
        return load_flash()(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                            dropout_p=dropout, softmax_scale=scaling, causal=True)
    mask, is_causal = attention_mask, False
    if mask is None and q_len == k_len:
        is_causal = q_len > 1
    elif mask is None and q_len > 1:
        # Cache without a mask: bottom-right aligned causal mask (only in chunked prefill; small).
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    extra = {}
    if n_rep > 1:
        if mask is None:
            extra["enable_gqa"] = True
        else:
            key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                         scale=scaling, is_causal=is_causal, **extra)
    return out.transpose(1, 2).contiguous()


def _score_dtype(query: torch.Tensor) -> torch.dtype:
    """float32 for half inputs (as eager's softmax), else the input dtype."""
    return torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype


def _in_backward() -> bool:
    """True while the autograd engine runs a backward pass on this thread: an attention call then is
    a non-reentrant checkpoint recomputation (the loss was built before backward started, so what it
    computes can never feed it). FSDP2 and torch's ModuleTracker use the same test."""
    return torch._C._current_graph_task_id() != -1


class _Rows:
    """The scores of the supervised rows of one layer's selected heads, chunked over row slots.

    Queries/keys are taken in float32 for half inputs (as eager's softmax), so the score matmul
    itself runs in float32: only rows x heads x T, cheap. Holds no CatContext (see _CausalMass)."""

    def __init__(self, query, key, idx, heads, key_valid, chunk_elems: int, scaling: float):
        bsz, n_heads, seq, _ = query.shape
        self.bsz, self.n_heads, self.n_kv, self.seq = bsz, n_heads, key.shape[1], seq
        self.n_rep, self.idx, self.key_valid, self.scaling = n_heads // key.shape[1], idx, key_valid, scaling
        self.acc = _score_dtype(query)
        self.heads = None if heads is None else heads.to(query.device)
        # Queries of the supervised rows, (B, Rmax, H, D): a gather, O(rows x H x D).
        q_rows = query.transpose(1, 2)[torch.arange(bsz, device=query.device)[:, None], idx.q_pad].to(self.acc)
        if self.heads is None:
            self.h = n_heads
            # Group query heads by their KV head so the matmul reads the KV heads without expanding them.
            self.q_sel = q_rows.view(bsz, idx.r_max, self.n_kv, self.n_rep, -1).permute(0, 2, 3, 1, 4)  # (B,Hkv,rep,R,D)
            self.k_sel = key.to(self.acc)
        else:
            self.h = self.heads.numel()
            self.q_sel = q_rows[:, :, self.heads].permute(0, 2, 1, 3)  # (B, h, Rmax, D)
            self.k_sel = key[:, self.heads // self.n_rep].to(self.acc)  # (B, h, T, D)
        step = max(1, chunk_elems // max(1, bsz * self.h * seq))
        self.ranges = [(s0, min(idx.r_max, s0 + step)) for s0 in range(0, idx.r_max, step)]

    def q_chunk(self, s0: int, s1: int) -> torch.Tensor:
        if self.heads is None:  # (B, Hkv, rep * s, D)
            return self.q_sel[:, :, :, s0:s1].reshape(self.bsz, self.n_kv, self.n_rep * (s1 - s0), -1)
        return self.q_sel[:, :, s0:s1]  # (B, h, s, D)

    def nnz(self, s0: int, s1: int):
        """(batch, slot within the chunk, column, row) of every causal column of the chunk's rows."""
        idx = self.idx
        if s0 == 0 and s1 == idx.r_max:  # one chunk (the usual case): every causal column
            return idx.nnz_b, idx.nnz_slot, idx.cols, idx.nnz_row
        sel = ((idx.nnz_slot >= s0) & (idx.nnz_slot < s1)).nonzero().squeeze(1)
        return idx.nnz_b[sel], idx.nnz_slot[sel] - s0, idx.cols[sel], idx.nnz_row[sel]

    def log_probs(self, s0: int, s1: int) -> torch.Tensor:
        """(B, h, s, T) log-softmax over the allowed keys of each slot (-inf elsewhere)."""
        scores = torch.matmul(self.q_chunk(s0, s1), self.k_sel.transpose(-1, -2))
        scores = scores.view(self.bsz, self.h, s1 - s0, self.seq).mul_(self.scaling)
        scores.masked_fill_(self.idx.blocked_keys(s0, s1, self.key_valid)[:, None], float("-inf"))
        return scores.sub_(torch.logsumexp(scores, dim=-1, keepdim=True))


class _CausalMass(torch.autograd.Function):
    """mass (R, h) = sum_{k in C} softmax(scores)_k per supervised row and selected head.

    Saves only query and key (the attention kernel saves them anyway: no extra memory); backward
    recomputes the rows' scores chunk by chunk, so no score tensor lives from forward to backward
    (with or without checkpointing). d mass / d score_k = p_k (1[k in C] - mass) on allowed keys."""

    @staticmethod
    def forward(fctx, query, key, spec, skip: bool):
        idx, heads, key_valid, chunk_elems, scaling, num_rows = spec
        fctx.spec = spec
        fctx.save_for_backward(query, key)
        if skip:  # a checkpoint recomputation: only the saved tensors matter (their number and order)
            return query.new_zeros((num_rows, query.shape[1] if heads is None else heads.numel()),
                                   dtype=_score_dtype(query))
        rows = _Rows(query, key, idx, heads, key_valid, chunk_elems, scaling)
        out = torch.zeros((num_rows, rows.h), dtype=rows.acc, device=query.device)
        for s0, s1 in rows.ranges:
            nb, ns, nc, nr = rows.nnz(s0, s1)
            out.index_add_(0, nr, rows.log_probs(s0, s1)[nb, :, ns, nc].exp_())
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(fctx, grad):
        query, key = fctx.saved_tensors
        idx, heads, key_valid, chunk_elems, scaling, num_rows = fctx.spec
        rows = _Rows(query, key, idx, heads, key_valid, chunk_elems, scaling)
        bsz, h = rows.bsz, rows.h
        g_pad = torch.zeros((bsz, idx.r_max, h), dtype=rows.acc, device=query.device)
        g_pad[idx.row_b, idx.slot] = grad.to(rows.acc)
        dq_sel, dk_sel = torch.zeros_like(rows.q_sel), torch.zeros_like(rows.k_sel)
        for s0, s1 in rows.ranges:
            nb, ns, nc, _ = rows.nnz(s0, s1)
            p = rows.log_probs(s0, s1).exp_()  # (B, h, s, T)
            pc = p[nb, :, ns, nc]  # (n, h): probabilities on the causal columns
            g_c = g_pad[nb, ns + s0]  # (n, h)
            m = torch.zeros((bsz, s1 - s0, h), dtype=rows.acc, device=query.device).index_put_((nb, ns), pc,
                                                                                                 accumulate=True)
            ds = p.mul_((m * g_pad[:, s0:s1]).permute(0, 2, 1)[..., None].neg_())  # -p * mass * g
            ds.permute(0, 2, 3, 1).index_put_((nb, ns, nc), pc * g_c, accumulate=True)  # + p * g on C
            ds.mul_(scaling)
            if rows.heads is None:
                ds = ds.view(bsz, rows.n_kv, rows.n_rep * (s1 - s0), rows.seq)
                dq_sel[:, :, :, s0:s1] = torch.matmul(ds, rows.k_sel).view(bsz, rows.n_kv, rows.n_rep, s1 - s0, -1)
            else:
                dq_sel[:, :, s0:s1] = torch.matmul(ds, rows.k_sel)
            dk_sel += torch.matmul(ds.transpose(-1, -2), rows.q_chunk(s0, s1))
        n_heads, dim = rows.n_heads, query.shape[-1]
        if rows.heads is None:
            dq_rows = dq_sel.permute(0, 3, 1, 2, 4).reshape(bsz, idx.r_max, n_heads, dim)
            dkey = dk_sel
        else:
            dq_rows = dq_sel.new_zeros((bsz, idx.r_max, n_heads, dim))
            dq_rows[:, :, rows.heads] = dq_sel.permute(0, 2, 1, 3)
            dkey = dk_sel.new_zeros((bsz, rows.n_kv, rows.seq, dim)).index_add_(1, rows.heads // rows.n_rep, dk_sel)
        dquery = dq_rows.new_zeros((bsz, rows.seq, n_heads, dim)).index_put_(
            (torch.arange(bsz, device=query.device)[:, None], idx.q_pad), dq_rows, accumulate=True)
        return dquery.transpose(1, 2).to(query.dtype), dkey.to(key.dtype), None, None


def causal_mass(query: torch.Tensor, key: torch.Tensor, ctx: CatContext, layer_idx: int,
                scaling: float, recomputing: bool | None = None) -> torch.Tensor:
    """Attention mass on each supervised row's causal columns: (R, h) for the layer's selected heads.

    query (B, H, T, D), key (B, Hkv, T, D), post-RoPE. Scores, softmax and mass in float32 for
    half inputs (as eager's softmax), else in the input dtype. Inside a backward pass (checkpoint
    recomputation) the value is not computed: only its saved inputs are recorded (see _CausalMass).
    """
    bsz, _, seq, _ = query.shape
    key_valid = None
    if ctx.key_padding_mask is not None:
        key_valid = ctx.key_padding_mask.to(device=query.device, dtype=torch.bool)[:, :seq]
    spec = (ctx.row_index(query.device, bsz, seq), ctx.heads_for(layer_idx), key_valid, ctx.chunk_elems, scaling,
            ctx.num_rows)
    return _CausalMass.apply(query, key, spec, _in_backward() if recomputing is None else recomputing)


def cat_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                  cat: CatContext | None = None, **kwargs):
    """transformers attention function: returns (output (B, S, H, D), None)."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    out = attention_output(query, key, value, attention_mask, dropout, scaling)
    layer_idx = getattr(module, "layer_idx", None)
    if cat is not None and cat.num_rows and layer_idx in cat.layers:
        window = kwargs.get("sliding_window")
        if window is not None and window < key.shape[2]:
            raise ValueError(f"CAT does not support sliding-window attention (layer {layer_idx}: window {window} "
                             f"< {key.shape[2]} tokens); select full-attention layers only")
        if query.shape[2] != key.shape[2]:
            raise ValueError("CAT supervision needs a full forward pass without a KV cache "
                             f"(layer {layer_idx}: q_len={query.shape[2]}, k_len={key.shape[2]})")
        recomputing = _in_backward()
        mass = causal_mass(query, key, cat, layer_idx, scaling, recomputing)
        if not recomputing:  # a recomputation's result feeds nothing: keeping it would keep its graph alive
            cat.mass[layer_idx] = mass  # overwrite, never append
    return out, None


def _right_padded(mask: torch.Tensor) -> bool:
    """True if every row is ones then zeros (no 0 followed by a 1)."""
    m = mask.bool()
    return not bool((~m[:, :-1] & m[:, 1:]).any())


def cat_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
             attention_mask=None, allow_is_causal_skip: bool = True, **kwargs):
    """sdpa's mask, except that a right-padded full forward gets no mask at all.

    With right padding and causal attention no real query ever sees a padded key, so the plain
    causal kernel is exact on every real token (padded positions carry no labels). This keeps
    the (B, 1, T, T) boolean mask out of training and lets flash-attn run.
    """
    if (allow_is_causal_skip and mask_function is causal_mask_function and attention_mask is not None
            and attention_mask.dim() == 2 and q_length == kv_length == attention_mask.shape[1]
            and isinstance(q_offset, int) and q_offset == 0 and _right_padded(attention_mask)):
        return None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset,
                     mask_function=mask_function, attention_mask=attention_mask,
                     allow_is_causal_skip=allow_is_causal_skip, **kwargs)


def register() -> str:
    """Register "cat_sdpa" with transformers (idempotent). Returns the name."""
    AttentionInterface.register(NAME, cat_attention)
    AttentionMaskInterface.register(NAME, cat_mask)
    return NAME


register()
