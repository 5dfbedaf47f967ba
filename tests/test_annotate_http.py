"""`cat-ds annotate` against a real OpenAI-compatible HTTP server (tests/openai_stub_server.py,
its own process on 127.0.0.1) through the real `openai` client: parsing of every answer
shape, retries, rejects, counts, resume after SIGKILL, and that the API key leaks nowhere."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import pytest

from cat_ds.annotate import AnnotateConfig, annotate_file
from cat_ds.annotate.store import record_id
from cat_ds.data.records import load_records
from cat_ds.data.spans import tokenize_example

HERE = Path(__file__).resolve().parent
STUB = HERE / "openai_stub_server.py"
CAT_DS = Path(sys.executable).parent / "cat-ds"

pytestmark = pytest.mark.slow  # every test here runs a server process


class Stub:
    """The stub server process, started with a script and stopped at the end of the test."""

    def __init__(self, tmp: Path, script: dict, expect_key_env: str | None = None, env: dict | None = None):
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "script.json").write_text(json.dumps(script))
        port_file = tmp / "port"
        cmd = [sys.executable, str(STUB), "--script", str(tmp / "script.json"), "--port-file", str(port_file)]
        if expect_key_env:
            cmd += ["--expect-key-env", expect_key_env]
        self.proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 30
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the stub server did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{port_file.read_text()}"
        self.base_url = self.url + "/v1"

    def counts(self) -> dict[str, int]:
        with urllib.request.urlopen(self.url + "/_stats", timeout=10) as r:
            return json.load(r)["counts"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def start_stub(tmp_path):
    started: list[Stub] = []

    def start(script: dict, **kw) -> Stub:
        s = Stub(tmp_path / f"stub{len(started)}", script, **kw)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def rec(name: str, **extra) -> dict:
    return {"input": f"Item {name}: x 4, y 5, z 7. Answer: ", "target": 9, **extra}


GOOD = '[{"Answer: 9": ["x 4", "y 5"]}]'
KEPT = [{"Answer: 9": ["x 4", "y 5"]}]

# name -> (steps, expected outcome)
CASES = {
    "json": [{"content": GOOD}],
    "fenced": [{"content": 'Here you go:\n```json\n' + GOOD + '\n```'}],
    "plain": [{"content": '{"Answer: 9": ["x 4", "y 5"]}'}],
    "absent": [{"content": '[{"Answer: 9": ["x 4", "w 99"]}, {"Ghost: 1": ["y 5"]}, {"x 4": ["Answer: 9"]}]'}],
    "garbage": [{"content": "I am sorry, I cannot annotate this."}],
    "r429": [{"status": 429, "headers": {"retry-after-ms": "10"}}, {"content": GOOD}],
    "r500": [{"status": 500}],
    "r500ok": [{"status": 503}, {"content": GOOD}],
    "slow": [{"delay": 6.0, "content": GOOD}, {"content": GOOD}],  # > the 3 s timeout
    "r400": [{"status": 400, "content": "prompt too long"}],
}


def script_for(cases: dict) -> dict:
    return {"rules": [{"name": n, "match": f"Item {n}:", "steps": s} for n, s in cases.items()]}


def test_annotate_every_answer_kind(tmp_path, start_stub, monkeypatch, bpe_tokenizer):
    stub = start_stub(script_for(CASES))
    records = [rec(n, idx=i) for i, n in enumerate(CASES)]
    records[0].pop("idx")  # one record identified by content hash instead
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out.jsonl"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-unit")
    cfg = AnnotateConfig(model="stub-model", base_url=stub.base_url, concurrency=4, max_retries=2,
                         timeout=3.0, backoff=0.01, progress=False)  # 3 s: no spurious timeouts on a busy CI
    s = annotate_file(src, out, cfg, echo=lambda _: None)

    lines = [json.loads(line) for line in out.read_text().splitlines()]
    by_name = {o["input"].split(":")[0].split()[1]: o for o in lines}
    assert sorted(by_name) == sorted(["json", "fenced", "plain", "absent", "r429", "r500ok", "slow"])
    for name, o in by_name.items():
        i = list(CASES).index(name)
        assert o == {**records[i], "important": [{"Answer: 9": ["x 4"]}] if name == "absent" else KEPT}
        assert list(o)[:2] == ["input", "target"] and o["target"] == 9  # the input record, unchanged
    loaded = load_records(out)
    assert all(r.important for r in loaded) and len(loaded) == 7
    for r in loaded:  # the validator and the mask builder agree: every kept pair gives rows
        ex = tokenize_example(r, bpe_tokenizer)
        assert ex.rows and not ex.skipped, (r.input, ex.skipped)

    rejects = {json.loads(line)["record"]["input"].split(":")[0].split()[1]: json.loads(line)
               for line in (tmp_path / "out.rejects.jsonl").read_text().splitlines()}
    assert sorted(rejects) == ["garbage", "r400", "r500"]
    assert rejects["garbage"]["reason"].startswith("unparsable: ") and rejects["garbage"]["attempts"] == 3
    assert rejects["garbage"]["last_answer"] == CASES["garbage"][0]["content"]
    assert rejects["r500"]["reason"].startswith("http_500: ") and rejects["r500"]["attempts"] == 3
    assert rejects["r400"]["reason"].startswith("http_400: ") and rejects["r400"]["attempts"] == 1
    assert "prompt too long" in rejects["r400"]["reason"]

    counts = stub.counts()
    assert counts == {"json": 1, "fenced": 1, "plain": 1, "absent": 1, "garbage": 3, "r429": 2,
                      "r500": 3, "r500ok": 2, "slow": 2, "r400": 1}
    assert s["annotated"] == 7 and s["rejected"] == 3 and s["already_done"] == 0
    assert s["annotated_with_pairs"] == 7 and s["annotated_without_pairs"] == 0
    assert s["pairs_proposed"] == 6 * 2 + 4 and s["pairs_kept"] == 6 * 2 + 1
    assert s["pairs_dropped"] == {"key_not_found": 1, "value_not_found": 1, "key_not_after_value": 1}
    assert s["rejects_by_reason"] == {"http_400": 1, "http_500": 1, "unparsable": 1}
    assert s["requests"] == sum(counts.values()) == 17 and s["retries"] == 17 - 10
    # Usage is counted for every 200 the client received: 7 annotated + 3 garbage answers
    # (the slow one's first 200 arrives after the client gave up).
    assert s["tokens"] == {"completion": 10 * 10, "prompt": 100 * 10, "total": 110 * 10}

    # A rerun retries only the rejected records and never duplicates the annotated ones.
    s2 = annotate_file(src, out, cfg, echo=lambda _: None)
    assert s2["already_done"] == 7 and s2["annotated"] == 0 and s2["rejected"] == 3
    assert len(out.read_text().splitlines()) == 7
    assert len((tmp_path / "out.rejects.jsonl").read_text().splitlines()) == 3


def _cli(args: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(CAT_DS), "annotate", *args], env=env, capture_output=True, text=True,
                          timeout=120, **kw)


def test_cli_key_never_leaks(tmp_path, start_stub):
    secret = "sk-cat-" + uuid.uuid4().hex
    env = {**os.environ, "CAT_ANNOTATE_KEY": secret, "OPENAI_LOG": "debug"}
    env.pop("OPENAI_API_KEY", None)
    # The server only answers requests that carry the key: a 200 proves it was sent.
    stub = start_stub(script_for({n: CASES[n] for n in ("json", "garbage", "r500", "r429")}),
                      expect_key_env="CAT_ANNOTATE_KEY", env=env)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(rec(n, idx=i)) + "\n" for i, n in enumerate(["json", "garbage", "r500", "r429"])))
    out, summ = tmp_path / "out.jsonl", tmp_path / "summary.json"
    common = ["--model", "m", "--base-url", stub.base_url, "--max-retries", "1", "--backoff", "0.01", "--timeout", "5"]
    r = _cli([str(src), "--out", str(out), *common, "--api-key-env", "CAT_ANNOTATE_KEY",
              "--summary-json", str(summ), "--progress", "--concurrency", "2"], env)
    assert r.returncode == 0, r.stderr
    assert "annotated: 2 (2 with pairs, 0 without)" in r.stdout
    assert "rejected: 2 (http_500=1, unparsable=1)" in r.stdout
    assert "tokens: completion=" in r.stdout
    assert "annotate:" in r.stderr and "rec/s" in r.stderr  # the progress bar, with its rate
    summary = json.loads(summ.read_text())
    assert summary["annotated"] == 2 and summary["rejected"] == 2

    # A wrong key stops the run at once with a clear error, still without echoing any key.
    bad_env = {**env, "CAT_ANNOTATE_KEY": "sk-wrong-" + uuid.uuid4().hex}
    r_bad = _cli([str(src), "--out", str(tmp_path / "o2.jsonl"), *common, "--api-key-env", "CAT_ANNOTATE_KEY"], bad_env)
    assert r_bad.returncode != 0 and "HTTP 401" in r_bad.stderr
    assert bad_env["CAT_ANNOTATE_KEY"] not in r_bad.stdout + r_bad.stderr
    # No key at all and no --base-url: refused before any request.
    no_env = {k: v for k, v in env.items() if k not in ("OPENAI_BASE_URL",)}
    r_none = _cli([str(src), "--out", str(tmp_path / "o3.jsonl"), "--model", "m", "--api-key-env", "UNSET_KEY_VAR"], no_env)
    assert r_none.returncode != 0 and "set the environment variable UNSET_KEY_VAR" in r_none.stderr

    dry = _cli([str(src), "--out", str(tmp_path / "o4.jsonl"), "--model", "m", "--dry-run"], env)
    assert dry.returncode == 0 and "Item json: x 4, y 5, z 7. Answer: " in dry.stdout
    assert not (tmp_path / "o4.jsonl").exists()

    texts = [r.stdout, r.stderr, r_none.stdout, r_none.stderr, dry.stdout, dry.stderr]
    texts += [p.read_text() for p in tmp_path.iterdir() if p.is_file()]
    assert all(secret not in t for t in texts)
    assert stub.counts()["json"] >= 1  # requests really went through with the key


def test_sigkill_mid_run_then_resume_gives_each_record_once(tmp_path, start_stub):
    n = 30
    names = [f"k{i:02d}" for i in range(n)]
    # Slow answers so the annotator can be killed in the middle of the file.
    stub = start_stub(script_for({nm: [{"delay": 0.25, "content": GOOD}] for nm in names}))
    records = [rec(nm) for nm in names]  # no id field: content-hash ids
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "OPENAI_API_KEY": "sk-kill"}
    args = [str(CAT_DS), "annotate", str(src), "--out", str(out), "--model", "m", "--base-url", stub.base_url,
            "--concurrency", "2", "--backoff", "0.01"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if out.exists() and out.read_text().count("\n") >= 6:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the annotator finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    done_before = out.read_bytes()
    n_before = done_before.count(b"\n")
    assert 6 <= n_before < n
    # Also simulate a kill inside a write: a torn last line of a record not yet written.
    written = {json.loads(line)["input"] for line in done_before.decode().splitlines() if line.strip()}
    pending = next(r for r in records if r["input"] not in written)
    torn = json.dumps({**pending, "important": KEPT})[:25].encode()
    out.write_bytes(done_before + torn)

    r = subprocess.run(args + ["--summary-json", str(tmp_path / "s.json")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["already_done"] == n_before and s["annotated"] == n - n_before
    assert s["torn_bytes_cut"] == len(torn)
    lines = out.read_text().splitlines()
    assert len(lines) == n
    ids = Counter(record_id(json.loads(line)) for line in lines)
    assert ids == Counter(record_id(r) for r in records)  # every record exactly once
    assert out.read_bytes().startswith(done_before)  # earlier work kept, byte for byte
    assert [rr.important for rr in load_records(out)] == [[("Answer: 9", ["x 4", "y 5"])]] * n
