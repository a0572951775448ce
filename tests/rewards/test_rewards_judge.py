"""The judge client against a fake OpenAI-compatible server on 127.0.0.1, and the offline RuleJudge."""

import http.server
import json
import logging
import os
import threading
import time

import pytest

from specs_jax import rewards
from specs_jax.rewards import judge as judge_lib

KEY = "sk-test-SECRET-0123456789"


class FakeServer:
  """Chat-completions endpoint whose reply is scripted by a marker in the last user message.

  Markers: OK (replies {"correct": true}), NO ({"correct": false}), BADJSON (200 with a non-JSON
  body every time), BADJSON_ONCE, R429_ONCE (429 with Retry-After 0, then OK), R500_TWICE, R500
  (always), R400 (not retryable), SLOW (sleeps 2 s), PAUSE (sleeps 0.5 s), UNREADABLE (a reply that is not a verdict),
  CONSISTENT (for the consistency prompt).
  """

  def __init__(self):
    self.requests = []          # (marker, auth header, body)
    self.in_flight = 0
    self.max_in_flight = 0
    self._lock = threading.Lock()
    self._seen: dict[str, int] = {}
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][-1]["content"]
        marker = next((m for m in ("BADJSON_ONCE", "BADJSON", "R429_ONCE", "R500_TWICE", "R500", "R400",
                                   "SLOW", "PAUSE", "UNREADABLE", "CONSISTENT", "NO", "OK") if m in text), "OK")
        with server._lock:
          server.requests.append((marker, self.headers.get("Authorization"), body))
          n = server._seen[text] = server._seen.get(text, 0) + 1
          server.in_flight += 1
          server.max_in_flight = max(server.max_in_flight, server.in_flight)
        self._counted = True
        try:
          self._reply(marker, n)
        finally:
          self._leave()

      def _leave(self):
        # Leave the in-flight count before the reply goes out: once the client has the reply it may
        # send its next request before this handler thread gets to run again (seen in CI on 2 cores).
        with server._lock:
          if getattr(self, "_counted", False):
            server.in_flight -= 1
            self._counted = False

      def _send(self, code, payload: bytes, headers=()):
        self._leave()
        self.send_response(code)
        for k, v in headers:
          self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

      def _chat(self, content):
        self._send(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode())

      def _reply(self, marker, n):
        if marker == "BADJSON" or (marker == "BADJSON_ONCE" and n == 1):
          return self._send(200, b"<html>upstream proxy error</html>")
        if marker == "R429_ONCE" and n == 1:
          return self._send(429, b'{"error": "rate limited"}', [("Retry-After", "0")])
        if (marker == "R500_TWICE" and n <= 2) or marker == "R500":
          return self._send(500, b'{"error": "boom"}')
        if marker == "R400":
          return self._send(400, b'{"error": "bad request"}')
        if marker in ("SLOW", "PAUSE"):
          time.sleep(2.0 if marker == "SLOW" else 0.5)
        if marker == "UNREADABLE":
          return self._chat("Well, it depends.")
        if marker == "CONSISTENT":
          return self._chat('{"consistent": true}')
        if marker == "NO":
          return self._chat('{"correct": false}')
        self._chat('```json\n{"correct": true}\n```')

    class Server(http.server.ThreadingHTTPServer):
      daemon_threads = True

      def handle_error(self, request, client_address):
        pass                            # a client that timed out and hung up (test_timeout)

    self.httpd = Server(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
    self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
    self.thread.start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
  for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("SPECS_TEST_JUDGE_KEY", KEY)
  s = FakeServer()
  yield s
  s.close()


def make(server, tmp_path, **kw):
  cfg = dict(base_url=server.url, model="fake-4o", api_key_env="SPECS_TEST_JUDGE_KEY", timeout_s=5.0,
             max_retries=3, backoff_s=0.01, max_backoff_s=0.05, concurrency=4, cache_dir=str(tmp_path / "cache"))
  cfg.update(kw)
  return rewards.OpenAIJudge(rewards.JudgeConfig(**cfg))


def answer(x: str) -> str:
  return f"<think> reasoning </think><answer> The answer is $\\boxed{{{x}}}$</answer>"


def test_success_sends_the_key_only_in_the_header(server, tmp_path):
  j = make(server, tmp_path)
  out = j.grade_answers(["Q OK"], [answer("a red cube")], ["red cube"])
  assert out[0].score == 1.0 and out[0].source == "judge" and out[0].error is None
  marker, auth, body = server.requests[0]
  assert auth == f"Bearer {KEY}"
  assert body["model"] == "fake-4o" and body["temperature"] == 0.0
  assert "a red cube" in body["messages"][-1]["content"] and "red cube" in body["messages"][-1]["content"]
  assert KEY not in json.dumps(body)
  assert KEY not in repr(j) and KEY not in repr(j.config)


def test_negative_verdict(server, tmp_path):
  assert make(server, tmp_path).grade_answers(["Q NO"], [answer("blue")], ["red"])[0].score == 0.0


def test_malformed_json_is_retried_then_fails(server, tmp_path):
  j = make(server, tmp_path)
  once = j.grade_answers(["Q BADJSON_ONCE"], [answer("x")], ["x"])[0]
  assert once.score == 1.0 and [m for m, _, _ in server.requests] == ["BADJSON_ONCE"] * 2
  always = j.grade_answers(["Q BADJSON"], [answer("x")], ["x"])[0]
  assert always.score is None and "malformed response body" in always.error
  assert sum(m == "BADJSON" for m, _, _ in server.requests) == 4      # 1 + max_retries


def test_unreadable_verdict_is_none(server, tmp_path):
  v = make(server, tmp_path).grade_answers(["Q UNREADABLE"], [answer("x")], ["x"])[0]
  assert v.score is None and v.raw == "Well, it depends." and "unreadable verdict" in v.error


def test_429_and_500_are_retried(server, tmp_path):
  j = make(server, tmp_path)
  out = j.grade_answers(["Q R429_ONCE", "Q R500_TWICE"], [answer("x"), answer("y")], ["x", "y"])
  assert [v.score for v in out] == [1.0, 1.0]
  markers = [m for m, _, _ in server.requests]
  assert markers.count("R429_ONCE") == 2 and markers.count("R500_TWICE") == 3
  assert j.counters["retries"] == 3 and j.counters["failures"] == 0


def test_persistent_500_fails_after_retries_and_400_is_not_retried(server, tmp_path):
  j = make(server, tmp_path, max_retries=2)
  v500, v400 = j.grade_answers(["Q R500", "Q R400"], [answer("x"), answer("y")], ["x", "y"])
  assert v500.score is None and "HTTP 500" in v500.error
  assert v400.score is None and "HTTP 400" in v400.error
  markers = [m for m, _, _ in server.requests]
  assert markers.count("R500") == 3 and markers.count("R400") == 1
  assert j.counters["failures"] == 2


def test_timeout(server, tmp_path):
  j = make(server, tmp_path, timeout_s=0.3, max_retries=1)
  t0 = time.perf_counter()
  v = j.grade_answers(["Q SLOW"], [answer("x")], ["x"])[0]
  assert time.perf_counter() - t0 < 1.5                   # 2 attempts x 0.3 s, not 2 x 2 s
  assert v.score is None and "timed out" in v.error.lower()


def test_cache_hit_needs_no_request(server, tmp_path):
  j = make(server, tmp_path)
  first = j.grade_answers(["Q OK"], [answer("7")], ["7"])[0]
  n = len(server.requests)
  again = make(server, tmp_path).grade_answers(["Q OK"], [answer("7")], ["7"])[0]   # a fresh client
  assert len(server.requests) == n
  assert first.source == "judge" and again.source == "cache" and again.score == 1.0
  other = j.grade_answers(["Q OK"], [answer("8")], ["7"])[0]                            # another request
  assert other.source == "judge" and len(server.requests) == n + 1
  failed = make(server, tmp_path, max_retries=0).grade_answers(["Q R500"], [answer("x")], ["x"])[0]
  assert failed.score is None
  files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "cache") for f in fs]
  assert len(files) == 2                                  # failures are not cached


def test_key_never_in_cache_or_logs(server, tmp_path, caplog):
  j = make(server, tmp_path, max_retries=1)
  with caplog.at_level(logging.DEBUG):
    j.grade_answers(["Q OK", "Q R500", "Q BADJSON"], [answer("1"), answer("2"), answer("3")], ["1", "2", "3"])
    j.check_consistency(["Q CONSISTENT"], [answer("1")])
  assert "failed" in caplog.text                          # the failures were logged ...
  assert KEY not in caplog.text                           # ... without the key
  cached = [open(os.path.join(d, f)).read() for d, _, fs in os.walk(tmp_path / "cache") for f in fs]
  assert len(cached) == 2 and all(KEY not in c for c in cached)


def test_key_is_redacted_from_errors(server, tmp_path):
  j = make(server, tmp_path)
  assert j._redact(f"server said: invalid key {KEY}", KEY) == "server said: invalid key ***"


def test_batching_respects_concurrency_and_dedupes(server, tmp_path):
  j = make(server, tmp_path, concurrency=2, cache_dir=None)
  qs = [f"Q PAUSE {i}" for i in range(4)]
  t0 = time.perf_counter()
  out = j.grade_answers(qs + qs[:2], [answer("1")] * 6, ["1"] * 6)
  elapsed = time.perf_counter() - t0
  assert [v.score for v in out] == [1.0] * 6
  assert len(server.requests) == 4 and server.max_in_flight == 2   # duplicates sent once, 2 at a time
  assert 0.9 < elapsed < 3.0                                     # 4 x 0.5 s in pairs: ~1 s


def test_no_answer_means_no_request(server, tmp_path):
  j = make(server, tmp_path)
  out = j.grade_answers(["Q OK"], ["<think>hmm</think>"], ["1"])
  assert out[0].score == 0.0 and server.requests == []
  out = j.check_consistency(["Q CONSISTENT"], ["<answer>1</answer>"])      # no reasoning
  assert out[0].score == 0.0 and server.requests == []


def test_consistency_request(server, tmp_path):
  v = make(server, tmp_path).check_consistency(["Q"], [
      "<think> 2+2=4 CONSISTENT </think><answer> The answer is $\\boxed{4}$</answer>"])[0]
  assert v.score == 1.0
  content = server.requests[0][2]["messages"][-1]["content"]
  assert "2+2=4" in content and "Final answer:\n4" in content


@pytest.mark.parametrize("content,key,expected", [
    ('{"correct": true}', "correct", 1.0), ('{"correct": false}', "correct", 0.0),
    ('```json\n{"correct": "yes"}\n```', "correct", 1.0), ("Yes, they match.", "correct", 1.0),
    ("No.", "correct", 0.0), ('{"consistent": true}', "correct", None), ("maybe", "correct", None),
    ("", "correct", None), ('{"correct": 7}', "correct", None), ("{" * 10_000, "correct", None),
])
def test_parse_verdict(content, key, expected):
  assert judge_lib.parse_verdict(content, key) == expected


def test_input_lengths_must_match(server, tmp_path):
  with pytest.raises(ValueError, match="differ in length"):
    make(server, tmp_path).grade_answers(["q"], [answer("1"), answer("2")], ["1"])


# ----------------------------------------------------------------------------- RuleJudge


@pytest.mark.parametrize("response,gold,expected", [
    (answer("a red cube"), "red cube", 1.0),
    (answer("Red cube."), "red cube", 1.0),
    (answer("blue cube"), "red cube", 0.0),
    (answer("not a red cube"), "red cube", 0.0),
    (answer("the large shiny red cube on the left"), "red cube", 0.0),   # too many extra words
    (answer("0.5"), r"\frac{1}{2}", 1.0),
    (answer("C"), "C", 1.0),
    ("<think>no answer</think>", "1", 0.0),
])
def test_rule_judge_grading(response, gold, expected):
  assert rewards.RuleJudge().grade_answers(["q"], [response], [gold])[0].score == expected


def test_rule_judge_bad_gold_has_no_verdict():
  v = rewards.RuleJudge().grade_answers(["q"], [answer("1")], [r"\frac{"])[0]
  assert v.score is None and r"'\\frac{'" in v.error


@pytest.mark.parametrize("response,expected", [
    ("<think> 3 + 4 = 7 </think><answer> The answer is $\\boxed{7}$</answer>", 1.0),
    ("<think> 3 + 4 = 7 </think><answer> The answer is $\\boxed{8}$</answer>", 0.0),
    ("<think> half of it, so the answer is 0.5 </think><answer>$\\boxed{\\frac{1}{2}}$</answer>", 1.0),
    ("<think> we get $x = \\frac{3}{4}$. </think><answer>0.75</answer>", 1.0),
    ("<think> Option (B) fits best. </think><answer>B</answer>", 1.0),
    ("<think> Option (B) fits best. </think><answer>C</answer>", 0.0),
    ("<think> it is the red cube </think><answer>red cube</answer>", 1.0),
    ("<think> it is the red cube </think><answer>blue sphere</answer>", 0.0),
    ("<think> there are 12 apples </think><answer>12</answer>", 1.0),
    ("<think></think><answer>12</answer>", 0.0),
    ("<think> 12 </think>", 0.0),
])
def test_rule_judge_consistency(response, expected):
  assert rewards.RuleJudge().check_consistency(["q"], [response])[0].score == expected


def test_make_judge():
  assert isinstance(rewards.make_judge("rule"), rewards.RuleJudge)
  j = rewards.make_judge("openai", base_url="http://127.0.0.1:9/v1", model="m")
  assert isinstance(j, rewards.OpenAIJudge) and j.config.model == "m"
  with pytest.raises(ValueError, match="unknown judge kind"):
    rewards.make_judge("gpt")
