"""LLM judges for the two judged steps of the recipe, with an offline rule-based default.

Uses (RECIPE.md §5 and the distillation stage):
1. `grade_answers(questions, responses, golds)`: is a short free-form final answer equivalent to the gold?
   (SPECS uses GPT-4o for short-answer questions; numbers and choices are graded by rule.)
2. `check_consistency(questions, responses)`: does the reasoning of a chosen response support its final
   answer? (the consistency filter of the self-distilled preference data).
Both return one `Verdict` per item; `score` is 1.0 / 0.0, or None when no verdict was obtained.

`OpenAIJudge` talks to any OpenAI-compatible `POST {base_url}/chat/completions` (OpenAI, a Gemini proxy,
vLLM) with the stdlib only: batching with a concurrency limit, retries with exponential backoff on
429/5xx/timeouts/malformed bodies (honouring Retry-After), and an on-disk cache keyed by the request
(URL + body; the key is not part of the request body and never reaches disk or logs). The API key is
read from the environment variable named in the config at request time, sent only in the
Authorization header, and redacted from every error message.

`RuleJudge` (judge_rules.py) answers both questions offline; `make_judge` picks one by name.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import http.client
import json
import logging
import os
import random
import re
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Protocol

from specs_jax.rewards import extract

__all__ = ["Completion", "Judge", "JudgeConfig", "JudgeError", "OpenAIJudge", "Verdict", "grade_messages",
           "consistency_messages", "make_judge", "parse_verdict"]

log = logging.getLogger(__name__)

_RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})

GRADE_SYSTEM = (
    "You grade answers. Decide whether the candidate's final answer is equivalent to the reference "
    "answer for the question: the same value, option or meaning, ignoring formatting, case, and units "
    "written or omitted. Reply with a JSON object only: {\"correct\": true} or {\"correct\": false}.")
CONSISTENCY_SYSTEM = (
    "You check solutions. Decide whether the final answer is the one the reasoning arrives at; do not "
    "judge whether it is actually correct. Reply with a JSON object only: {\"consistent\": true} or "
    "{\"consistent\": false}.")


class JudgeError(RuntimeError):
  """A request that failed for good (after retries, or a non-retryable HTTP status)."""


@dataclasses.dataclass(frozen=True)
class Verdict:
  """One judged item. score: 1.0, 0.0, or None (no verdict: request failed or reply unreadable).
  source: "judge", "cache" or "rule". raw: the judge's reply text (None for rules)."""

  score: float | None
  source: str
  raw: str | None = None
  error: str | None = None


class Judge(Protocol):
  def grade_answers(self, questions: Sequence[str], responses: Sequence[str],
                    golds: Sequence[str]) -> list[Verdict]: ...

  def check_consistency(self, questions: Sequence[str], responses: Sequence[str]) -> list[Verdict]: ...


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
  """An OpenAI-compatible endpoint. The key itself is never stored here, only the variable's name.

  Attributes:
    base_url: e.g. "https://api.openai.com/v1" or "http://127.0.0.1:8000/v1"; "/chat/completions" is appended.
    model: model name sent in the request.
    api_key_env: environment variable holding the key; unset or empty sends no Authorization header.
    timeout_s: per-request socket timeout.
    max_retries: retries after the first attempt (so max_retries + 1 attempts at most).
    backoff_s, max_backoff_s: delay before retry k is min(max_backoff_s, backoff_s * 2**k) * U(0.5, 1],
      or the server's Retry-After when given (capped at max_backoff_s).
    concurrency: requests in flight at once.
    cache_dir: directory for the response cache (None: no cache).
    temperature, max_tokens: sent in every request.
  """

  base_url: str = "https://api.openai.com/v1"
  model: str = "gpt-4o"
  api_key_env: str = "OPENAI_API_KEY"
  timeout_s: float = 60.0
  max_retries: int = 4
  backoff_s: float = 1.0
  max_backoff_s: float = 30.0
  concurrency: int = 8
  cache_dir: str | None = None
  temperature: float = 0.0
  max_tokens: int = 64

  def __post_init__(self):
    if self.max_retries < 0 or self.concurrency < 1 or self.timeout_s <= 0:
      raise ValueError(f"JudgeConfig needs max_retries >= 0, concurrency >= 1, timeout_s > 0; got "
                       f"{self.max_retries}, {self.concurrency}, {self.timeout_s}")


@dataclasses.dataclass(frozen=True)
class Completion:
  """One chat completion: text (None on failure), cached, attempts made, error (None on success)."""

  text: str | None
  cached: bool = False
  attempts: int = 0
  error: str | None = None


def grade_messages(question: str, answer: str, gold: str) -> list[dict[str, str]]:
  """Chat messages asking whether `answer` is equivalent to `gold`."""
  return [{"role": "system", "content": GRADE_SYSTEM},
          {"role": "user", "content": f"Question:\n{question}\n\nReference answer:\n{gold}\n\n"
                                      f"Candidate final answer:\n{answer}"}]


def consistency_messages(question: str, reasoning: str, answer: str) -> list[dict[str, str]]:
  """Chat messages asking whether `reasoning` arrives at `answer`."""
  return [{"role": "system", "content": CONSISTENCY_SYSTEM},
          {"role": "user", "content": f"Question:\n{question}\n\nReasoning:\n{reasoning}\n\n"
                                      f"Final answer:\n{answer}"}]


_YES = {"true", "yes", "correct", "consistent", "1"}
_NO = {"false", "no", "incorrect", "inconsistent", "0"}


def parse_verdict(content: str | None, key: str) -> float | None:
  """Reads a judge reply: a JSON object with `key` (bool or yes/no string), else a leading yes/no
  word; None when neither is there. Only `json.loads` touches the reply."""
  if not content:
    return None
  start, end = content.find("{"), content.rfind("}")
  if 0 <= start < end:
    try:
      obj = json.loads(content[start:end + 1])
    except (ValueError, RecursionError):
      obj = None
    if isinstance(obj, dict):               # a JSON verdict without our key is no verdict
      v = obj.get(key)
      if isinstance(v, bool):
        return float(v)
      if isinstance(v, str) and v.strip().lower() in _YES | _NO:
        return float(v.strip().lower() in _YES)
      return None
  m = re.match(r"\W*(\w+)", content[:200])
  if m and m.group(1).lower() in _YES | _NO:
    return float(m.group(1).lower() in _YES)
  return None


class OpenAIJudge:
  """Client for an OpenAI-compatible chat-completions endpoint (see module docstring).

  Thread-safe; `counters` holds requests sent, cache hits, retries and failures since construction.
  """

  def __init__(self, config: JudgeConfig):
    self.config = config
    self._url = config.base_url.rstrip("/") + "/chat/completions"
    self._lock = threading.Lock()
    self.counters = {"requests": 0, "cache_hits": 0, "retries": 0, "failures": 0}

  def __repr__(self) -> str:
    return f"OpenAIJudge(url={self._url!r}, model={self.config.model!r}, key from ${self.config.api_key_env})"

  # -- plumbing

  def _count(self, name: str, k: int = 1) -> None:
    with self._lock:
      self.counters[name] += k

  def _body(self, messages: list[dict[str, str]]) -> dict:
    return {"model": self.config.model, "messages": messages, "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens}

  def cache_key(self, body: dict) -> str:
    """sha256 of the URL and the canonical JSON body (the API key is not part of either)."""
    blob = json.dumps({"url": self._url, "body": body}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()

  def _cache_path(self, key: str) -> str | None:
    if not self.config.cache_dir:
      return None
    return os.path.join(self.config.cache_dir, key[:2], key + ".json")

  def _cache_get(self, key: str) -> str | None:
    path = self._cache_path(key)
    if path is None or not os.path.exists(path):
      return None
    try:
      with open(path, encoding="utf-8") as f:
        entry = json.load(f)
      return entry["content"] if isinstance(entry.get("content"), str) else None
    except (OSError, ValueError, KeyError):
      return None                          # a torn or foreign file is a miss, and gets rewritten

  def _cache_put(self, key: str, body: dict, content: str) -> None:
    path = self._cache_path(key)
    if path is None:
      return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump({"url": self._url, "request": body, "content": content, "time": time.time()}, f,
                ensure_ascii=False)
    os.replace(tmp, path)                  # atomic: concurrent writers of one key are harmless

  def _redact(self, msg: str, key: str | None) -> str:
    return msg.replace(key, "***") if key else msg

  def _post_once(self, body: dict, key: str | None) -> str:
    """One HTTP attempt: the reply's message content, or raises _Retryable / JudgeError."""
    headers = {"Content-Type": "application/json"}
    if key:
      headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(self._url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
      with urllib.request.urlopen(req, timeout=self.config.timeout_s) as resp:
        raw = resp.read()
    except urllib.error.HTTPError as e:
      retry_after = _retry_after(e.headers.get("Retry-After") if e.headers else None)
      detail = _safe_read(e)
      msg = f"HTTP {e.code} from {self._url}: {detail}"
      if e.code in _RETRY_STATUS:
        raise _Retryable(msg, retry_after) from None
      raise JudgeError(msg) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
      reason = getattr(e, "reason", e)
      raise _Retryable(f"{type(reason).__name__} talking to {self._url}: {reason}", None) from None
    try:
      content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
      raise _Retryable(f"malformed response body from {self._url}: {raw[:200]!r}", None) from None
    if not isinstance(content, str):
      raise _Retryable(f"response content is {type(content).__name__}, not a string", None)
    return content

  def complete_one(self, messages: list[dict[str, str]]) -> Completion:
    """One chat completion with cache, retries and backoff. Never raises for network or HTTP errors."""
    body = self._body(messages)
    key_hash = self.cache_key(body)
    cached = self._cache_get(key_hash)
    if cached is not None:
      self._count("cache_hits")
      return Completion(cached, cached=True)
    api_key = os.environ.get(self.config.api_key_env) or None
    error = ""
    for attempt in range(self.config.max_retries + 1):
      self._count("requests")
      try:
        content = self._post_once(body, api_key)
      except _Retryable as e:
        error = self._redact(str(e), api_key)
        if attempt == self.config.max_retries:
          break
        delay = e.retry_after if e.retry_after is not None else (
            self.config.backoff_s * 2 ** attempt * random.uniform(0.5, 1.0))
        delay = min(delay, self.config.max_backoff_s)
        log.warning("judge: attempt %d/%d failed (%s); retrying in %.2fs", attempt + 1,
                    self.config.max_retries + 1, error[:200], delay)
        self._count("retries")
        time.sleep(delay)
        continue
      except JudgeError as e:
        error = self._redact(str(e), api_key)
        break
      try:
        self._cache_put(key_hash, body, content)
      except OSError as e:                 # a full or read-only disk costs the cache, not the verdict
        log.warning("judge: cannot write cache entry: %s", e)
      return Completion(content, attempts=attempt + 1)
    self._count("failures")
    log.error("judge: request failed for good: %s", error[:300])
    return Completion(None, attempts=attempt + 1, error=error)

  def complete(self, batch: Sequence[list[dict[str, str]]]) -> list[Completion]:
    """Completions for a batch of message lists, at most `concurrency` requests in flight. Identical
    requests in a batch are sent once."""
    bodies = [json.dumps(m, sort_keys=True) for m in batch]
    first: dict[str, list[dict[str, str]]] = {}
    for b, m in zip(bodies, batch):
      first.setdefault(b, m)
    unique = list(first)
    workers = max(1, min(self.config.concurrency, len(unique)))
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="judge") as ex:
      done = dict(zip(unique, ex.map(lambda b: self.complete_one(first[b]), unique)))
    return [done[b] for b in bodies]

  # -- the two uses

  def grade_answers(self, questions: Sequence[str], responses: Sequence[str],
                    golds: Sequence[str]) -> list[Verdict]:
    """Is each response's final answer (`extract_answer`) equivalent to its gold? A response with no
    final answer scores 0 without a request."""
    _same_length(questions=questions, responses=responses, golds=golds)
    answers = [extract.extract_answer(r) for r in responses]
    todo = [i for i, a in enumerate(answers) if a is not None]
    done = self.complete([grade_messages(questions[i], answers[i], golds[i]) for i in todo])
    out = [Verdict(0.0, "rule", error="no final answer")] * len(responses)
    for i, c in zip(todo, done):
      out[i] = _to_verdict(c, "correct")
    return out

  def check_consistency(self, questions: Sequence[str], responses: Sequence[str]) -> list[Verdict]:
    """Does each response's <think> reasoning arrive at its final answer? Missing reasoning or answer
    scores 0 without a request."""
    _same_length(questions=questions, responses=responses)
    parts = [(extract.think_span(r), extract.extract_answer(r)) for r in responses]
    todo = [i for i, (t, a) in enumerate(parts) if t and t.strip() and a is not None]
    done = self.complete([consistency_messages(questions[i], parts[i][0], parts[i][1]) for i in todo])
    out = [Verdict(0.0, "rule", error="no reasoning or no final answer")] * len(responses)
    for i, c in zip(todo, done):
      out[i] = _to_verdict(c, "consistent")
    return out


class _Retryable(Exception):
  def __init__(self, msg: str, retry_after: float | None):
    super().__init__(msg)
    self.retry_after = retry_after


def _retry_after(value: str | None) -> float | None:
  try:
    return max(0.0, float(value)) if value is not None else None
  except ValueError:
    return None                            # an HTTP date: fall back to our own backoff


def _safe_read(e: urllib.error.HTTPError) -> str:
  try:
    return e.read(300).decode("utf-8", "replace")
  except Exception:  # noqa: BLE001 - the body is only for the message
    return ""


def _to_verdict(c: Completion, key: str) -> Verdict:
  if c.text is None:
    return Verdict(None, "judge", error=c.error)
  score = parse_verdict(c.text, key)
  return Verdict(score, "cache" if c.cached else "judge", raw=c.text,
                 error=None if score is not None else f"unreadable verdict: {c.text[:100]!r}")


def _same_length(**seqs: Sequence) -> None:
  lengths = {k: len(v) for k, v in seqs.items()}
  if len(set(lengths.values())) != 1:
    raise ValueError(f"judge inputs differ in length: {lengths}")


def make_judge(kind: str = "rule", **kwargs) -> Judge:
  """"rule" -> RuleJudge(**kwargs) (offline); "openai" -> OpenAIJudge(JudgeConfig(**kwargs))."""
  if kind == "rule":
    from specs_jax.rewards.judge_rules import RuleJudge
    return RuleJudge(**kwargs)
  if kind == "openai":
    return OpenAIJudge(JudgeConfig(**kwargs))
  raise ValueError(f"unknown judge kind {kind!r}; known: ['openai', 'rule']")
