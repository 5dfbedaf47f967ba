"""A small OpenAI-compatible chat-completions server for the annotator's tests.

Run as its own process (the tests start and stop it):

    python tests/openai_stub_server.py --script SCRIPT.json --port-file PORT [--expect-key-env NAME]

It binds 127.0.0.1 on a free port and writes the port to PORT. SCRIPT holds rules,
tried in order against the last message's text; the first rule whose `match` substring
occurs answers, the n-th request of a rule getting `steps[min(n, len-1)]`:

    {"rules": [{"name": "r429", "match": "case-429", "steps": [{"status": 429}, {"content": "[...]"}]}],
     "default": {"steps": [{"content": "[]"}]}}

A step: `status` (200), `content` (the assistant text), `delay` (seconds before
answering), `headers` (extra response headers), `usage` ([prompt, completion] tokens,
default [100, 10]; null sends no usage). With --expect-key-env the server answers 401
unless `Authorization: Bearer <that variable's value>`. GET /_stats returns request counts
per rule. Nothing about requests' headers is ever printed or logged.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _State:
    def __init__(self, script: dict, expected_key: str | None):
        self.rules = script.get("rules", [])
        self.default = script.get("default", {"steps": [{"status": 404, "content": "no rule matched"}]})
        self.expected_key = expected_key
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()
        self.seq = 0

    def next_step(self, text: str) -> tuple[str, dict]:
        rule = next((r for r in self.rules if r["match"] in text), None)
        name = rule["name"] if rule else "default"
        steps = (rule or self.default)["steps"]
        with self.lock:
            n = self.counts.get(name, 0)
            self.counts[name] = n + 1
            self.seq += 1
        return name, steps[min(n, len(steps) - 1)]


class _Handler(BaseHTTPRequestHandler):
    state: _State  # set on the class by main()
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib name)
        return  # quiet: the tests read stdout/stderr of other processes, not this one

    def _send(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, str(v))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its timeout): nothing left to answer

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/_stats":
            with self.state.lock:
                self._send(200, {"counts": dict(self.state.counts), "requests": self.state.seq})
        else:
            self._send(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._send(404, {"error": {"message": f"unknown path {self.path}"}})
            return
        st = self.state
        if st.expected_key is not None and self.headers.get("Authorization") != f"Bearer {st.expected_key}":
            self._send(401, {"error": {"message": "invalid API key", "type": "invalid_request_error"}})
            return
        messages = body.get("messages") or [{}]
        text = messages[-1].get("content") or ""
        name, step = st.next_step(text)
        if step.get("delay"):
            time.sleep(float(step["delay"]))
        status = int(step.get("status", 200))
        if status != 200:
            msg = step.get("content", f"stub error {status} for rule {name}")
            self._send(status, {"error": {"message": msg, "type": "stub_error", "code": status}},
                       step.get("headers"))
            return
        out = {
            "id": f"chatcmpl-stub-{st.seq}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "stub"),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": step.get("content", "")}}],
        }
        usage = step.get("usage", [100, 10])
        if usage is not None:
            out["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                            "total_tokens": usage[0] + usage[1]}
        self._send(200, out, step.get("headers"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--script", required=True)
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--expect-key-env", default=None)
    args = ap.parse_args()
    with open(args.script, encoding="utf-8") as fh:
        script = json.load(fh)
    key = os.environ[args.expect_key_env] if args.expect_key_env else None
    _Handler.state = _State(script, key)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    tmp = args.port_file + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(str(server.server_address[1]))
    os.replace(tmp, args.port_file)  # atomic: the test never reads a half-written port
    server.serve_forever()


if __name__ == "__main__":
    main()
