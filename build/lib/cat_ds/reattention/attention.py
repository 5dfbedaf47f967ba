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
C = sum_{k in C} exp(score - lse). Memory O(rows x heads x T); never T x T. Gradients reach the
queries and keys. The result OVERWRITES ``ctx.mass[layer_idx]`` (see context.py).
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
_HAS_FLASH = importlib.util.find_spec("flash_attn") is not None


def _flash_usable(query: torch.Tensor) -> bool:
    return _HAS_FLASH and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] <= 256


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
        from flash_attn import flash_attn_func  # handles GQA natively

        return flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
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


def causal_mass(query: torch.Tensor, key: torch.Tensor, ctx: CatContext, layer_idx: int,
                scaling: float) -> torch.Tensor:
    """Attention mass on each supervised row's causal columns: (R, h) for the layer's selected heads.

    query (B, H, T, D), key (B, Hkv, T, D), post-RoPE. Computed in float32 for half inputs
    (as eager's softmax), else in the input dtype.
    """
    bsz, n_heads, seq, _ = query.shape
    n_rep = n_heads // key.shape[1]
    idx = ctx.row_index(query.device, bsz, seq)
    heads = ctx.heads_for(layer_idx)
    acc = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    # Queries of the supervised rows, (B, Rmax, H, D): a gather, O(rows x H x D).
    q_rows = query.transpose(1, 2)[torch.arange(bsz, device=query.device)[:, None], idx.q_pad]
    if heads is None:
        h = n_heads
        # Group query heads by their KV head so the matmul reads the KV heads without expanding them.
        q_sel = q_rows.view(bsz, idx.r_max, key.shape[1], n_rep, -1).permute(0, 2, 3, 1, 4)  # (B,Hkv,rep,Rmax,D)
        k_sel = key
    else:
        heads = heads.to(query.device)
        h = heads.numel()
        q_sel = q_rows[:, :, heads].permute(0, 2, 1, 3)  # (B, h, Rmax, D)
        k_sel = key[:, heads // n_rep]  # (B, h, T, D)
    key_valid = None
    if ctx.key_padding_mask is not None:
        key_valid = ctx.key_padding_mask.to(device=query.device, dtype=torch.bool)[:, :seq]
    step = max(1, ctx.chunk_elems // max(1, bsz * h * seq))
    row_parts, p_parts = [], []
    for s0 in range(0, idx.r_max, step):
        s1 = min(idx.r_max, s0 + step)
        if heads is None:
            qc = q_sel[:, :, :, s0:s1].reshape(bsz, key.shape[1], n_rep * (s1 - s0), -1)
            scores = torch.matmul(qc, k_sel.transpose(-1, -2)).view(bsz, n_heads, s1 - s0, seq)
        else:
            scores = torch.matmul(q_sel[:, :, s0:s1], k_sel.transpose(-1, -2))  # (B, h, s, T)
        scores = scores.to(acc) * scaling
        scores = scores.masked_fill(idx.blocked_keys(s0, s1, key_valid)[:, None], float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # (B, h, s)
        if s0 == 0 and s1 == idx.r_max:  # one chunk (the usual case): every causal column
            nb, ns, nc, nr = idx.nnz_b, idx.nnz_slot, idx.cols, idx.nnz_row
        else:
            sel = ((idx.nnz_slot >= s0) & (idx.nnz_slot < s1)).nonzero().squeeze(1)
            nb, ns, nc, nr = idx.nnz_b[sel], idx.nnz_slot[sel] - s0, idx.cols[sel], idx.nnz_row[sel]
        p_parts.append(torch.exp(scores[nb, :, ns, nc] - lse[nb, :, ns]))  # (n, h)
        row_parts.append(nr)
    p = torch.cat(p_parts) if p_parts else query.new_zeros((0, h), dtype=acc)
    rows = torch.cat(row_parts) if row_parts else idx.nnz_row
    return torch.zeros((ctx.num_rows, h), dtype=acc, device=query.device).index_add(0, rows, p)


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
        cat.mass[layer_idx] = causal_mass(query, key, cat, layer_idx, scaling)  # overwrite, never append
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
