"""Small tokenizers trained locally (no download), saved as Hugging Face tokenizer dirs.

Two families, because offsets and whitespace behave differently in each:
- `bpe`: byte-level BPE (GPT-2 / Llama-3 / Qwen family); no BOS, EOS "<|endoftext|>".
- `sentencepiece`: SentencePiece-style BPE with a metaspace pre-tokenizer and single-digit
  splitting (Llama-2 / TinyLlama family); BOS "<s>" prepended, EOS "</s>".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from cat_ds.choices import TOKENIZER_KINDS as KINDS


def _texts(files: Iterable[str | Path]) -> Iterator[str]:
    """Training text: `input + target` of JSONL/JSON records, or raw lines of other files."""
    from cat_ds.data.records import load_records

    for f in files:
        f = Path(f)
        if f.suffix in (".jsonl", ".json"):
            for r in load_records(f):
                yield r.text
        else:
            yield from f.read_text(encoding="utf-8").splitlines()


def train_tokenizer(files: Iterable[str | Path], kind: str, vocab_size: int, out_dir: str | Path):
    """Train, save to `out_dir` (tokenizer.json + config) and return the fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    files = list(files)
    if kind == "bpe":
        special = ["<|endoftext|>", "<|pad|>"]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_texts(files), trainer=trainer)
        names = dict(bos_token=None, eos_token="<|endoftext|>", pad_token="<|pad|>", unk_token=None)
    else:
        special = ["<unk>", "<s>", "</s>", "<pad>"]
        tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
             pre_tokenizers.Digits(individual_digits=True)]
        )
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False)
        tok.train_from_iterator(_texts(files), trainer=trainer)
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
        )
        names = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **{k: v for k, v in names.items() if v})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    (out / "cat_ds_tokenizer.json").write_text(json.dumps({"kind": kind, "vocab_size": vocab_size}) + "\n")
    return fast


def load_tokenizer(name_or_dir: str | Path):
    """A fast tokenizer by local dir or hub name; offset mappings need a fast one."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(name_or_dir))
    if not tok.is_fast:
        raise ValueError(f"{name_or_dir}: a fast tokenizer is required (offset mappings)")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # right padding is masked out; any id works
    return tok
