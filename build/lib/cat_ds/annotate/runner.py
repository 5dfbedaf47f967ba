"""Annotate a CAT file through any OpenAI-compatible chat-completions endpoint.

Threads (bounded by `concurrency`) each send one record at a time with the official
`openai` client, whose own retries are disabled so that ours (exponential backoff with
jitter, honouring Retry-After) are the only ones and are counted. The main thread alone
writes: one output line per finished record, appended and flushed at once, so a run can be
killed at any point and rerun (see `store`). The API key is read from the environment, is
handed only to the client, and is redacted from every message we write.
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cat_ds.annotate.parsing import DROP_REASONS, ParseError, parse_answer, to_record_shape, validate_pairs
from cat_ds.annotate.prompts import load_examples, load_template, render_examples, render_prompt
from cat_ds.annotate.store import (
    JsonlAppender,
    OutputLocked,
    default_rejects_path,
    load_done,
    pending_indices,
    read_raw_records,
    same_file,
)
from cat_ds.data.records import normalize_target

_RETRY_STATUS = {408, 409, 429}  # plus every 5xx
_FATAL_STATUS = {401, 403, 404}  # wrong key / no such model: every record would fail


class AnnotateError(RuntimeError):
    """A run-level failure (bad key, unknown model, missing key): nothing more is sent."""


@dataclass
class AnnotateConfig:
    model: str
    base_url: str | None = None
    concurrency: int = 8
    max_retries: int = 5
    timeout: float = 120.0
    backoff: float = 1.0  # first retry waits ~this long (seconds), doubling after
    max_backoff: float = 60.0
    temperature: float | None = 0.0
    max_tokens: int | None = None
    prompt_template: str | None = None
    examples: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    rejects: str | None = None
    progress: bool | None = None  # None: only on a terminal


@dataclass
class _Outcome:
    index: int
    important: list | None = None  # kept pairs; None when rejected
    dropped: Counter = field(default_factory=Counter)
    proposed: int = 0
    reason: str | None = None
    attempts: int = 0
    usage: Counter = field(default_factory=Counter)
    last_answer: str | None = None


class _Redactor:
    def __init__(self, secret: str | None):
        self.secret = secret if secret and len(secret) >= 4 else None

    def __call__(self, s: str, limit: int = 500) -> str:
        if self.secret:
            s = s.replace(self.secret, "***")
        return s if len(s) <= limit else s[:limit] + "..."


def resolve_api_key(env_name: str, base_url: str | None) -> str:
    key = os.environ.get(env_name)
    if key:
        return key
    if base_url or os.environ.get("OPENAI_BASE_URL"):
        return "EMPTY"  # a local server without auth (e.g. vLLM) accepts any key
    raise AnnotateError(
        f"no API key: set the environment variable {env_name} (or name another one with "
        "--api-key-env); for a local server without auth pass --base-url"
    )


def _retry_after(response: Any) -> float | None:
    """Seconds from Retry-After / retry-after-ms, if the server sent them."""
    headers = getattr(response, "headers", None) or {}
    try:
        if headers.get("retry-after-ms"):
            return float(headers["retry-after-ms"]) / 1000
        if headers.get("retry-after"):
            return float(headers["retry-after"])
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff
    return None


def _backoff(cfg: AnnotateConfig, attempt: int, retry_after: float | None) -> float:
    d = min(cfg.max_backoff, cfg.backoff * 2**attempt)
    delay = d / 2 + random.uniform(0, d / 2)  # "equal jitter": spread, but never ~0
    if retry_after is not None:
        delay = max(delay, min(retry_after, cfg.max_backoff))
    return delay


def _annotate_one(client: Any, cfg: AnnotateConfig, prompt: str, text: str, index: int,
                  stop: threading.Event, redact: _Redactor) -> _Outcome:
    import openai

    out = _Outcome(index)
    messages = [{"role": "user", "content": prompt}]
    extra: dict[str, Any] = {}
    if cfg.temperature is not None:
        extra["temperature"] = cfg.temperature
    if cfg.max_tokens is not None:
        extra["max_tokens"] = cfg.max_tokens
    for attempt in range(cfg.max_retries + 1):
        if stop.is_set():
            return out
        out.attempts += 1
        retry_after = None
        try:
            resp = client.chat.completions.create(model=cfg.model, messages=messages, **extra)
        except openai.APITimeoutError:
            out.reason = f"timeout: no reply within {cfg.timeout}s"
        except openai.APIConnectionError as e:
            out.reason = f"connection_error: {redact(str(e))}"
        except openai.APIStatusError as e:
            code = e.status_code
            if code in _FATAL_STATUS:
                raise AnnotateError(f"the endpoint answered HTTP {code}: {redact(str(e))}") from None
            out.reason = f"http_{code}: {redact(str(e))}"
            if not (code in _RETRY_STATUS or code >= 500):
                return out  # e.g. 400 (prompt too long): retrying cannot help
            retry_after = _retry_after(e.response)
        else:
            usage = getattr(resp, "usage", None)
            for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
                if usage is not None and isinstance(getattr(usage, name, None), int):
                    out.usage[name] += getattr(usage, name)
            content = resp.choices[0].message.content if resp.choices else None
            try:
                parsed = parse_answer(content)
            except ParseError as e:
                out.reason = f"unparsable: {redact(str(e), 200)}"
                out.last_answer = redact(content or "")
            else:
                kept, dropped, _ = validate_pairs(text, parsed)
                out.important, out.dropped, out.reason = kept, dropped, None
                out.proposed = sum(len(v) for _, v in parsed)
                return out
        if attempt < cfg.max_retries and stop.wait(_backoff(cfg, attempt, retry_after)):
            out.reason = None  # stopping: the record stays pending for the next run
            return out
    return out


def annotate_file(in_path: str | Path, out_path: str | Path, cfg: AnnotateConfig, *,
                  dry_run: bool = False, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Annotate every record of `in_path` not yet in `out_path`; returns the summary."""
    rejects_path = Path(cfg.rejects) if cfg.rejects else default_rejects_path(out_path)
    if same_file(in_path, out_path) or Path(rejects_path).resolve() in (Path(out_path).resolve(), Path(in_path).resolve()):
        raise AnnotateError(f"{out_path}: the output, the rejects file and the input must be three different files")
    raw = read_raw_records(in_path)
    template = load_template(cfg.prompt_template)
    examples_text = render_examples(load_examples(cfg.examples))

    def prompt_of(i: int) -> str:
        return render_prompt(template, examples_text, raw[i]["input"], normalize_target(raw[i]["target"], ""))

    if dry_run:
        if raw:
            echo(prompt_of(0))
        return {"records": len(raw), "dry_run": True}

    key = resolve_api_key(cfg.api_key_env, cfg.base_url)
    redact = _Redactor(key)
    try:
        out = JsonlAppender(out_path, lock=True)  # locked before reading what is done
    except OutputLocked as e:
        raise AnnotateError(str(e)) from None
    with out:
        return _resume_and_run(raw, prompt_of, cfg, key, redact, out, out_path, rejects_path)


def _resume_and_run(raw, prompt_of, cfg, key, redact, out, out_path, rejects_path) -> dict[str, Any]:
    done, torn = load_done(out_path)
    todo, _ = pending_indices(raw, done)
    summary: dict[str, Any] = {
        "records": len(raw), "already_done": len(raw) - len(todo), "torn_bytes_cut": torn,
        "annotated": 0, "annotated_with_pairs": 0, "annotated_without_pairs": 0,
        "pairs_proposed": 0, "pairs_kept": 0, "pairs_dropped": dict.fromkeys(DROP_REASONS, 0),
        "rejected": 0, "rejects_by_reason": {}, "requests": 0, "retries": 0, "tokens": None,
        "output": str(out_path), "rejects_file": str(rejects_path),
    }
    t0 = time.monotonic()
    if todo:
        _run(raw, todo, prompt_of, cfg, key, redact, out, rejects_path, summary)
    elif rejects_path.exists():
        rejects_path.write_bytes(b"")  # the rejects file lists this run's failures only
    summary["elapsed_s"] = round(time.monotonic() - t0, 3)
    return summary


def _results(pool, todo, raw, prompt_of, client, cfg, stop, redact):
    """Finished records as they complete. Only a small window is submitted at a time, so
    prompts are built lazily and memory stays flat on large files."""
    pending = iter(todo)
    inflight: set = set()
    window = 2 * max(1, cfg.concurrency)
    while True:
        for i in pending:
            text = raw[i]["input"] + normalize_target(raw[i]["target"], "")
            inflight.add(pool.submit(_annotate_one, client, cfg, prompt_of(i), text, i, stop, redact))
            if len(inflight) >= window:
                break
        if not inflight:
            return
        finished, inflight = wait(inflight, return_when=FIRST_COMPLETED)
        for fut in finished:
            yield fut.result()  # AnnotateError propagates and ends the run


def _run(raw, todo, prompt_of, cfg, key, redact, out, rejects_path, summary) -> None:
    import openai
    from tqdm import tqdm

    client = openai.OpenAI(api_key=key, base_url=cfg.base_url, timeout=cfg.timeout, max_retries=0)
    stop = threading.Event()
    dropped: Counter = Counter()
    rejects: Counter = Counter()
    tokens: Counter = Counter()
    pool = ThreadPoolExecutor(max_workers=max(1, cfg.concurrency), thread_name_prefix="annotate")
    bar = tqdm(total=len(todo), unit="rec", desc="annotate", file=sys.stderr, dynamic_ncols=True,
               disable=None if cfg.progress is None else not cfg.progress)
    try:
        with JsonlAppender(rejects_path, "wb") as rej:
            for res in _results(pool, todo, raw, prompt_of, client, cfg, stop, redact):
                summary["requests"] += res.attempts
                tokens.update(res.usage)
                if res.important is not None:
                    rec = dict(raw[res.index])
                    rec["important"] = to_record_shape(res.important)
                    out.write(rec)
                    kept = sum(len(v) for _, v in res.important)
                    summary["annotated"] += 1
                    summary["annotated_with_pairs" if kept else "annotated_without_pairs"] += 1
                    summary["pairs_proposed"] += res.proposed
                    summary["pairs_kept"] += kept
                    dropped.update(res.dropped)
                elif res.reason is not None:
                    entry = {"index": res.index, "reason": res.reason, "attempts": res.attempts,
                             "record": raw[res.index]}
                    if res.last_answer is not None:
                        entry["last_answer"] = res.last_answer
                    rej.write(entry)
                    summary["rejected"] += 1
                    rejects[res.reason.split(":", 1)[0]] += 1
                bar.update(1)
                bar.set_postfix(ok=summary["annotated"], rejected=summary["rejected"],
                                kept=summary["pairs_kept"], retries=summary["requests"] - bar.n)
    finally:
        stop.set()  # wake sleeping workers; in-flight requests end within the timeout
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        client.close()
    summary["retries"] = summary["requests"] - summary["annotated"] - summary["rejected"]
    summary["pairs_dropped"].update(dropped)
    summary["rejects_by_reason"] = dict(sorted(rejects.items()))
    if tokens:
        summary["tokens"] = {k.replace("_tokens", ""): v for k, v in sorted(tokens.items())}


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"records: {s['records']} (already done before this run: {s['already_done']})",
        f"annotated: {s['annotated']} ({s['annotated_with_pairs']} with pairs, "
        f"{s['annotated_without_pairs']} without)",
        f"pairs: {s['pairs_proposed']} proposed, {s['pairs_kept']} kept, dropped "
        + ", ".join(f"{k}={v}" for k, v in s["pairs_dropped"].items()),
        f"rejected: {s['rejected']}"
        + (" (" + ", ".join(f"{k}={v}" for k, v in s["rejects_by_reason"].items()) + ")" if s["rejected"] else "")
        + (f" -> {s['rejects_file']}" if s["rejected"] else ""),
        f"requests: {s['requests']} ({s['retries']} retries)",
    ]
    if s.get("tokens"):
        lines.append("tokens: " + ", ".join(f"{k}={v}" for k, v in s["tokens"].items()))
    if s.get("torn_bytes_cut"):
        lines.append(f"resumed after a torn last line ({s['torn_bytes_cut']} bytes cut)")
    lines.append(f"output: {s['output']} ({s.get('elapsed_s', 0)}s)")
    return "\n".join(lines)
