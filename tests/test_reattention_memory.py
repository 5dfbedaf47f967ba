"""The CAT path never allocates a T x T tensor (forward and backward), checked by recording the
shape of every tensor every aten op returns; the research-style path is the positive control."""
import pytest
import torch
from reattention_ref import make_batch, reference, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from cat_ds.reattention import CatContext, reattention_loss

T = 384


class ShapeRecorder(TorchDispatchMode):
    """Records (op, shape) of every tensor produced while active, including autograd's backward
    ops (the CPU autograd engine runs them in this thread)."""

    def __init__(self, seq_len: int):
        super().__init__()
        self.seq_len, self.big, self.ops = seq_len, [], set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and (
                (t.dim() >= 2 and t.shape[-1] >= self.seq_len and t.shape[-2] >= self.seq_len)
                or t.numel() >= self.seq_len * self.seq_len
            ):
                self.big.append((str(func), tuple(t.shape)))
        return out


def _batch():
    # 2 records, right padding (the training layout), 2 keys each, rows late in the sequence.
    return make_batch([T, T - 37], seed=3, n_keys=2)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_cat_path_allocates_no_t_by_t_tensor(checkpointing):
    model = tiny_model("llama", dtype=torch.float32, hidden=32, heads=4)
    model.set_attn_implementation("cat_sdpa")
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    batch = _batch()
    ctx = CatContext.from_batch(batch, layers=[0, 1], num_heads=4)
    rec = ShapeRecorder(T)
    with rec:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                    cat=ctx)
        res = reattention_loss(ctx, alpha=1e9)
        (out.loss + res.loss).backward()
    assert res.num_counted > 0 and sorted(ctx.mass) == [0, 1]
    assert any("backward" in op for op in rec.ops)  # the recorder did see the backward pass
    assert rec.big == [], rec.big[:5]


def test_recorder_catches_the_research_path():
    model = tiny_model("llama", dtype=torch.float32, hidden=32, heads=4)
    batch = _batch()
    rec = ShapeRecorder(T)
    with rec:
        lm, cat, _ = reference(model, batch, alpha=1e9, loss_type="div")
    assert any(shape[-2:] == (T, T) for _, shape in rec.big)


def _saved_bytes(tensors, exclude) -> int:
    """Bytes of the tensors that the autograd graphs behind `tensors` still hold (saved for
    backward and not yet freed), parameters (`exclude`) left out."""
    stack, seen, ptrs, total = [t.grad_fn for t in tensors], set(), set(exclude), 0
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        saved = []
        for name in [n for n in dir(fn) if n.startswith("_saved_")] + ["saved_tensors"]:
            try:
                value = getattr(fn, name)
            except (RuntimeError, AttributeError):  # freed by backward, or not this node's kind
                continue
            saved += [v for v in (value if isinstance(value, (tuple, list)) else [value]) if isinstance(v, torch.Tensor)]
        for t in saved:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in ptrs:
                ptrs.add(ptr)
                total += t.untyped_storage().nbytes()
        stack += [f for f, _ in fn.next_functions]
    return total


@pytest.mark.parametrize("checkpointing", [False, True])
def test_nothing_recomputed_outlives_backward(checkpointing):
    """What the context holds after backward is the forward's mass, whose graph backward freed:
    a checkpoint recomputation (which runs the attention function again) leaves nothing behind
    (it used to store its own mass there, keeping its keys, scores and graph until the next step)."""
    model = tiny_model("llama", dtype=torch.float32, hidden=64, heads=4)
    model.set_attn_implementation("cat_sdpa")
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    batch = _batch()
    ctx = CatContext.from_batch(batch, layers=[0, 1], num_heads=4)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"], cat=ctx)
    forward_mass = dict(ctx.mass)
    if not checkpointing:  # the walk sees a live graph (under checkpointing, reading one would recompute it)
        assert _saved_bytes(forward_mass.values(), params) > 2 * T * 64 * 4  # at least the layer-0 keys
    res = reattention_loss(ctx, alpha=1e9)
    (out.loss + res.loss).backward()
    del out, res
    assert all(ctx.mass[layer] is forward_mass[layer] for layer in (0, 1))
    assert _saved_bytes(ctx.mass.values(), params) == 0
