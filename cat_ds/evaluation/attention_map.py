"""Where the answer looks: the attention of the rows that produce the answer on each earlier token.

Rows and causal columns follow the training data's rules (`cat_ds.data.spans`): an annotated
record's mask rows (the rows that produce each key, the answer in STG) and the union of their
causal columns. A record without annotations, or whose phrases match nothing, uses the rows that
produce its target's tokens and has no causal columns (it is still shaded).

The masses come from the project's attention function (`cat_ds.reattention`): every (row q,
earlier token k) pair is passed as one supervised row whose only column is k, so `causal_mass`
returns that pair's softmax probability per layer and head, without a T x T map (O(pairs x heads)
per layer). A row's own token gets 1 - the rest. Averaged over heads and answer rows; over layers
too, and kept per layer on request. Always under torch.no_grad().

Shares, per record and model: `causal` (mass on the causal columns) and `non-causal` (the rest,
the row's own token included: the two add to 1). On STG records also each field ("Smoking: 3",
the three causal values, their twins per `choices.STG_TWINS`, the two irrelevant ones) and
`rest` (prompt words, "Answer:", the answer rows themselves).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from cat_ds.choices import STG_TWINS
from cat_ds.data.records import CatRecord
from cat_ds.data.spans import _TokenMap, tokenize_example
from cat_ds.data.stg import STG_NAMES, STG_PROMPT

CAUSAL, NON_CAUSAL, REST = "causal", "non-causal", "rest"
STG_CAUSES = [cause for cause, _ in STG_TWINS.values()]
STG_IRRELEVANT = [n for n in STG_NAMES if n not in STG_TWINS and n not in STG_CAUSES]
# Chart order: the causal values, their twins (in the same order), the irrelevant ones.
STG_FIELDS = STG_CAUSES + [t for c in STG_CAUSES for t, (cause, _) in STG_TWINS.items() if cause == c] + STG_IRRELEVANT


def field_role(name: str) -> str:
    """"causal", "twin of <cause>" or "irrelevant" for an STG field (STG_TWINS says which)."""
    if name in STG_TWINS:
        return f"twin of {STG_TWINS[name][0]}"
    return "causal" if name in STG_CAUSES else "irrelevant"


@dataclass
class RecordMap:
    """One record: what is drawn, and per model the mean attention on each column 0..rows[-1]."""

    index: int  # position in the sample's source list
    source: str  # file:line
    target: str
    input_ids: list[int]
    tokens: list[str]  # display text of each column
    rows: list[int]  # the rows that produce the answer
    causal: list[int]
    fields: dict[str, list[int]] = field(default_factory=dict)  # STG field -> its columns
    attention: dict[str, list[float]] = field(default_factory=dict)  # model -> (columns,)
    layers: dict[str, list[list[float]]] = field(default_factory=dict)  # model -> (layers, columns)

    def groups(self) -> dict[str, list[int]]:
        """Share groups: causal (if annotated), each STG field; the complements are derived."""
        return ({CAUSAL: self.causal} if self.causal else {}) | self.fields

    def shares(self, model: str, layer: int | None = None) -> dict[str, float]:
        att = self.attention[model] if layer is None else self.layers[model][layer]
        out = {g: float(sum(att[c] for c in cols)) for g, cols in self.groups().items()}
        if self.causal:
            out[NON_CAUSAL] = float(sum(att)) - out[CAUSAL]
        if self.fields:
            out[REST] = float(sum(att)) - sum(out[f] for f in self.fields)
        return out


@dataclass
class AttentionTable:
    models: dict[str, str] = field(default_factory=dict)  # label -> where it came from
    records: list[RecordMap] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # one line per bad input
    per_layer: bool = False

    def summary(self, layer: int | None = None) -> dict[str, dict[str, tuple[float, int]]]:
        """{model: {group: (mean share over the records that have it, n)}}."""
        out: dict[str, dict[str, tuple[float, int]]] = {}
        for m in self.models:
            acc: dict[str, list[float]] = {}
            for r in self.records:
                if m in r.attention:
                    for g, v in r.shares(m, layer).items():
                        acc.setdefault(g, []).append(v)
            out[m] = {g: (sum(v) / len(v), len(v)) for g, v in acc.items()}
        return out

    def num_layers(self) -> int:
        return max((len(v) for r in self.records for v in r.layers.values()), default=0)

    def to_json(self) -> dict:
        recs = [{"index": r.index, "source": r.source, "target": r.target, "input_ids": r.input_ids,
                 "tokens": r.tokens, "rows": r.rows,
                 "causal": r.causal, "fields": r.fields, "attention": r.attention,
                 "shares": {m: r.shares(m) for m in r.attention}} for r in self.records]
        out = {"models": self.models, "records": recs, "problems": self.problems,
               "summary": {m: {g: {"mean": v, "n": n} for g, (v, n) in s.items()} for m, s in self.summary().items()}}
        if self.per_layer:
            out["summary_per_layer"] = [self.summary(layer) for layer in range(self.num_layers())]
            for j, r in zip(recs, self.records):
                j["shares_per_layer"] = {m: [r.shares(m, i) for i in range(len(v))] for m, v in r.layers.items()}
        return out


def ordered_groups(groups) -> list[str]:
    order = [CAUSAL, NON_CAUSAL, *STG_FIELDS, REST]
    return sorted(set(groups), key=lambda g: (order.index(g) if g in order else len(order), g))


def sample_indices(total: int, n: int | None, seed: int = 0) -> list[int]:
    """A fixed, seeded sample of n of `total` record indices, in file order (all if n is None)."""
    if n is None or n >= total:
        return list(range(total))
    return sorted(random.Random(seed).sample(range(total), n))


def answer_rows(ex, eos_id: int | None) -> list[int]:
    """Rows producing the answer: the mask rows, else those producing the target's tokens (the
    EOS after them only when the target has none). Row t produces token t + 1 (spans.py)."""
    if ex.rows:
        return [q for q, _ in ex.rows]
    end = len(ex.input_ids)
    if end - ex.answer_start > 1 and ex.input_ids[-1] == eos_id:
        end -= 1
    return [t - 1 for t in range(max(ex.answer_start, 1), end)]


def stg_fields(record: CatRecord, tokenizer, n_cols: int) -> dict[str, list[int]]:
    """STG's fields ("Smoking: 3") as token columns; {} for a record that is not STG."""
    text = record.text
    if STG_PROMPT not in record.input:
        return {}
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)  # as tokenize_example
    tmap = _TokenMap([tuple(o) for o in enc["offset_mapping"]])
    out = {}
    for name in STG_FIELDS:
        m = re.search(re.escape(name) + r": -?\d+(?:\.\d+)?", text)
        span = m and tmap.tokens(*m.span())
        if span and span[1] <= n_cols:
            out[name] = list(range(*span))
    return out


def prepare(record: CatRecord, tokenizer, index: int) -> RecordMap | None:
    """Rows, columns and token texts of one record (None: nothing produces an answer)."""
    ex = tokenize_example(record, tokenizer)
    rows = answer_rows(ex, tokenizer.eos_token_id)
    if not rows:
        return None
    n = rows[-1] + 1
    causal = sorted({c for _, cols in ex.rows for c in cols})
    tokens = [tokenizer.decode([t]) for t in ex.input_ids[:n]]
    return RecordMap(index, record.source, record.target, ex.input_ids[:n], tokens, rows, causal,
                     stg_fields(record, tokenizer, n))


@torch.no_grad()
def column_mass(model, input_ids: list[int], rows: list[int]) -> torch.Tensor:
    """(layers, rows, columns) attention mass of each row on every token k <= q, heads averaged."""
    from cat_ds.evaluation.probe import measuring
    from cat_ds.reattention import CatContext

    cfg = model.config
    n_layers, n = cfg.num_hidden_layers, rows[-1] + 1
    pairs = [(i, q, k) for i, q in enumerate(rows) for k in range(q)]
    ctx = CatContext(torch.tensor([[0, q] for _, q, _ in pairs], dtype=torch.long).reshape(-1, 2),
                     torch.arange(len(pairs) + 1), torch.tensor([k for *_, k in pairs], dtype=torch.long),
                     layers=list(range(n_layers)), num_heads=cfg.num_attention_heads)
    ids = torch.tensor([input_ids[:n]], device=model.device)
    with measuring(model):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), cat=ctx)
    out = torch.zeros(n_layers, len(rows), n, dtype=torch.float64)
    if pairs:
        ri = torch.tensor([i for i, *_ in pairs])
        ki = torch.tensor([k for *_, k in pairs])
        for layer in range(n_layers):
            out[layer, ri, ki] = ctx.mass[layer].double().mean(dim=1).cpu()
    for i, q in enumerate(rows):  # the row's own token: the softmax's remaining mass
        out[:, i, q] = 1 - out[:, i, :q].sum(dim=1)
    return out


def context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def add_model(table: AttentionTable, label: str, model, tokenizer, records: Sequence[tuple[int, CatRecord]],
              where: str = "") -> None:
    """Measure `model` on the records; records and their tokens come from the first model measured.
    Every rank of a ZeRO-3 run must call this alike (the forwards gather parameters)."""
    table.models[label] = where or label
    known = {r.index: r for r in table.records}
    limit = context_length(model)
    for index, record in records:
        rm = prepare(record, tokenizer, index)
        if rm is None:
            line = f"{record.source}: no answer tokens to measure; skipped"
            table.problems += [line] if line not in table.problems else []
            continue
        if limit is not None and len(rm.input_ids) > limit:
            table.problems.append(f"{record.source}: {len(rm.input_ids)} tokens, longer than the context of {label} "
                                  f"({limit}); skipped for it")
            continue
        if index in known and known[index].input_ids != rm.input_ids:
            table.problems.append(f"{record.source}: {label}'s tokenizer splits it differently; skipped for it")
            continue
        mass = column_mass(model, rm.input_ids, rm.rows).mean(dim=1)  # (layers, columns)
        target = known.get(index) or rm
        target.attention[label] = mass.mean(dim=0).tolist()
        if table.per_layer:
            target.layers[label] = mass.tolist()
        if index not in known:
            table.records.append(rm)
            known[index] = rm
    table.records.sort(key=lambda r: r.index)


def load_model_dir(path: str | Path):
    """(model, tokenizer) from an exported model directory or a peft adapter directory."""
    from transformers import AutoModelForCausalLM

    from cat_ds.data.tokenizers import load_tokenizer

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such directory")
    dtype = "auto" if torch.cuda.is_available() else torch.float32  # CPUs here have no fast half types
    if (p / "adapter_config.json").is_file():  # `export`'s adapter/ (or any peft adapter): merged on load
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(str(p), dtype=dtype).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype)
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model, load_tokenizer(p)


def model_label(path: str | Path, taken: set[str]) -> str:
    """runs/x_base/export -> x_base; .../export/adapter -> x_base (adapter); unique among `taken`."""
    p = Path(path).resolve()
    name = p.name
    if name == "adapter":
        name = f"{p.parent.parent.name if p.parent.name == 'export' else p.parent.name} (adapter)"
    elif name == "export":
        name = p.parent.name
    label, i = name, 2
    while label in taken:
        label, i = f"{name} #{i}", i + 1
    return label


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def load_sample(data: Sequence[str | Path], n: int | None, seed: int, problems: list[str]) -> list[tuple[int, CatRecord]]:
    """The seeded sample over every readable file's records; each unreadable file is one line in `problems`."""
    from cat_ds.data.records import RecordError, load_records

    records: list[CatRecord] = []
    for f in data:
        try:
            records.extend(load_records(f, collect_errors=True))
        except RecordError as e:
            more = f" (and {len(e.errors) - 1} more errors)" if len(e.errors) > 1 else ""
            problems.append(f"{e.errors[0]}{more}; file skipped")
        except (OSError, ValueError) as e:  # messages name the file: "x.jsonl: no such file"
            problems.append(f"{_one_line(e)}; file skipped")
    return [(i, records[i]) for i in sample_indices(len(records), n, seed)]


def measure_dirs(model_dirs: Sequence[str | Path], data: Sequence[str | Path], *, records: int | None = 8, seed: int = 0,
                 per_layer: bool = False, chat_template: bool = False, labels: Sequence[str] | None = None,
                 say: Callable[[str], None] = print) -> AttentionTable:
    """One model at a time (only one in memory); bad inputs become one line each in `table.problems`."""
    table = AttentionTable(per_layer=per_layer)
    sample = load_sample(data, records, seed, table.problems)
    for i, d in enumerate(model_dirs):
        label = labels[i] if labels else model_label(d, set(table.models))
        try:
            model, tokenizer = load_model_dir(d)
        except Exception as e:  # any load failure: this model is left out, the others are drawn
            table.problems.append(f"{d}: cannot load the model ({type(e).__name__}: {_one_line(e)}); skipped")
            continue
        recs = sample
        if chat_template:  # a model trained with data.chat_template is measured on the same text
            from cat_ds.data.chat import render

            recs = list(zip([i for i, _ in sample], render([r for _, r in sample], tokenizer)))
        say(f"[attention] {label}: {len(recs)} record(s) from {d}")
        add_model(table, label, model, tokenizer, recs, str(d))
        del model
    return table
