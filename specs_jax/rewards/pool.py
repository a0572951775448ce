"""Reward grading in worker processes with per-item timeouts and a global deadline.

    with pool.RewardPool(num_workers=2) as p:                  # start once per stage
      rewards, stats = pool.grade_batch(texts, golds, config, pool=p)
    rewards.total        # [N] float32 = format_weight * format + accuracy_weight * accuracy
    stats.as_metrics()   # {"rewards/timeouts": …, "rewards/crashes": …, …} for metrics.jsonl

Why processes: math-verify relies on signal.alarm (main thread only) and SymPy can hang inside C code
(huge integers) where no signal reaches. Workers are started with "spawn" (or "forkserver"), never
"fork": the training process has JAX's threads running and forking it is unsafe.

Per item, in this order:
- the format reward and the answer extraction run in the parent (string scans, linear time);
- identical (answer, gold) pairs are graded once (GRPO groups repeat answers);
- a worker grades the answer under a setitimer interrupt at `item_timeout_s` (status "timeout");
  a worker still busy `kill_grace_s` later is killed and replaced (also "timeout");
- a worker that dies or raises gives status "crash"; an unparseable gold gives "bad_gold";
- items not finished by the deadline get "deadline", and busy workers are killed then.
Every status but "ok" scores 0 for the item (format included), is counted in `GradeStats` and logged.
Nothing in this module raises because of a response; `raise_on_bad_gold` raises for bad data.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from specs_jax.rewards import extract, registry
from specs_jax.rewards.config import GradeConfig, RewardConfig

__all__ = ["BatchRewards", "GradeStats", "RewardPool", "STATUSES", "grade_batch"]

log = logging.getLogger(__name__)

STATUSES = ("ok", "timeout", "crash", "bad_gold", "deadline")
_MAX_START_FAILURES = 3


# ----------------------------------------------------------------------------- worker side


class _SoftTimeout(BaseException):
  """Raised by the worker's SIGALRM handler. A BaseException so that math-verify's and SymPy's
  `except Exception` blocks cannot swallow it."""


def _on_alarm(signum, frame):
  raise _SoftTimeout()


def _limit_address_space(extra_mb: int) -> None:
  """RLIMIT_AS = what this process maps now + extra_mb. Relative, because the imports already made
  (numpy's BLAS reserves per-core buffers) can exceed any fixed limit on a many-core host."""
  import resource
  try:
    with open("/proc/self/statm") as f:
      current = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError):
    return                                           # not Linux: no limit rather than a wrong one
  _, hard = resource.getrlimit(resource.RLIMIT_AS)
  limit = current + int(extra_mb) * 2**20
  if hard != resource.RLIM_INFINITY:
    limit = min(limit, hard)
  resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _worker_main(conn: multiprocessing.connection.Connection, memory_mb: int | None) -> None:
  """Worker loop: receive (job_id, grader, answer, gold, config, timeout_s), send (job_id, status, score, detail)."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)       # Ctrl-C is the parent's to handle
  if memory_mb:
    _limit_address_space(memory_mb)
  # Graders here run without math-verify's own alarms (inprocess_timeout_s=0): they would reset
  # our itimer. Its "timeout disabled" warning is expected, so silence it in this process only.
  logging.getLogger("math_verify").setLevel(logging.ERROR)
  from specs_jax.rewards import accuracy
  signal.signal(signal.SIGALRM, _on_alarm)
  conn.send(("ready", os.getpid()))
  while True:
    try:
      msg = conn.recv()
    except (EOFError, OSError):
      return
    if msg is None:
      return
    job_id, grader, answer, gold, config, timeout_s = msg
    config = dataclasses.replace(config, inprocess_timeout_s=0)
    try:
      fn = registry.accuracy_grader(grader) if isinstance(grader, str) else grader
      signal.setitimer(signal.ITIMER_REAL, timeout_s)
      try:
        score = float(fn(answer, gold, config))
      finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
      reply = (job_id, "ok", score if 0.0 <= score <= 1.0 else 0.0, "")
    except _SoftTimeout:
      reply = (job_id, "timeout", 0.0, f"interrupted after {timeout_s:.2f}s")
    except accuracy.GoldError as e:
      reply = (job_id, "bad_gold", 0.0, str(e))
    except BaseException as e:  # noqa: BLE001 - RecursionError, MemoryError, bugs: score 0, keep serving
      reply = (job_id, "crash", 0.0, f"{type(e).__name__}: {str(e)[:200]}")
    conn.send(reply)


# ----------------------------------------------------------------------------- parent side


@dataclasses.dataclass(eq=False)
class _Worker:
  proc: Any
  conn: multiprocessing.connection.Connection
  ready: bool = False
  job: int | None = None
  started: float = 0.0


class RewardPool:
  """Grading worker processes; one instance per stage, closed at the end (or use `with`).

  The pool holds processes, not results: every `run` call is independent. A worker that times out or
  dies is replaced; replacements start in the background and join when ready. One caller at a time:
  `run` is not meant to be entered from two threads at once.
  """

  def __init__(self, num_workers: int = 2, mp_context: str = "spawn", worker_memory_mb: int | None = 4096):
    if mp_context not in ("spawn", "forkserver"):
      raise ValueError(f"mp_context must be 'spawn' or 'forkserver', got {mp_context!r}")
    self._ctx = multiprocessing.get_context(mp_context)
    self._memory_mb = worker_memory_mb
    self._workers = [self._spawn() for _ in range(num_workers)]
    self.restarts = 0
    self._start_failures = 0

  def _spawn(self) -> _Worker:
    parent_conn, child_conn = self._ctx.Pipe(duplex=True)
    proc = self._ctx.Process(target=_worker_main, args=(child_conn, self._memory_mb), daemon=True,
                             name="specs_jax-reward-worker")
    proc.start()
    child_conn.close()
    return _Worker(proc=proc, conn=parent_conn)

  def _replace(self, w: _Worker) -> None:
    if w.proc.is_alive():
      w.proc.kill()
    w.proc.join(timeout=2.0)
    w.conn.close()
    if not w.ready:
      self._start_failures += 1
      if self._start_failures >= _MAX_START_FAILURES:
        raise RuntimeError(f"reward workers died {self._start_failures} times before becoming ready "
                           f"(exit code {w.proc.exitcode}); check that specs_jax.rewards imports in a "
                           "fresh interpreter")
    self._workers[self._workers.index(w)] = self._spawn()
    self.restarts += 1

  def close(self) -> None:
    """Stops all workers (politely, then by force)."""
    for w in self._workers:
      try:
        w.conn.send(None)
      except (OSError, ValueError):
        pass
    for w in self._workers:
      w.proc.join(timeout=1.0)
      if w.proc.is_alive():
        w.proc.kill()
        w.proc.join(timeout=1.0)
      w.conn.close()
    self._workers = []

  def __enter__(self) -> "RewardPool":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  @property
  def num_workers(self) -> int:
    return len(self._workers)

  def wait_ready(self, timeout_s: float = 60.0) -> bool:
    """Blocks until every worker has started (imports done), or timeout_s passes. Returns whether all
    are ready. Optional: `run` also waits for workers, inside its deadline."""
    end = time.monotonic() + timeout_s
    while not all(w.ready for w in self._workers):
      left = end - time.monotonic()
      if left <= 0:
        return False
      starting = {w.conn: w for w in self._workers if not w.ready}
      starting.update({w.proc.sentinel: w for w in self._workers if not w.ready})
      for h in multiprocessing.connection.wait(list(starting), timeout=left):
        w = starting[h]
        if not any(w is x for x in self._workers) or w.ready:
          continue
        if w.conn.poll():
          self._handle_message(w, [], [])         # "ready", or EOF from a worker that died starting
        else:
          self._replace(w)
    return True

  def _handle_message(self, w: _Worker, results: list, details: list) -> None:
    try:
      msg = w.conn.recv()
    except (EOFError, OSError):
      self._on_death(w, results, details)
      return
    if msg[0] == "ready":
      w.ready, self._start_failures = True, 0
      return
    job_id, status, score, detail = msg
    if job_id == w.job:
      results[job_id], details[job_id] = (status, score), detail
    w.job = None

  def _on_death(self, w: _Worker, results: list, details: list) -> None:
    if w.job is not None:
      results[w.job], details[w.job] = ("crash", 0.0), f"worker died (exit code {w.proc.exitcode})"
    self._replace(w)

  def run(self, jobs: Sequence[tuple[str | None, str]], grader: str | Callable[..., float],
          config: GradeConfig, *, item_timeout_s: float, kill_grace_s: float,
          deadline: float) -> tuple[list[tuple[str, float]], list[str]]:
    """Grades (answer, gold) jobs. `deadline` is a time.monotonic() value.

    Returns:
      [(status, score)] and [detail] in job order; status in STATUSES.
    """
    if not self._workers:
      raise RuntimeError("RewardPool is closed")
    results: list = [None] * len(jobs)
    details = [""] * len(jobs)
    queue = collections.deque(range(len(jobs)))
    hard_s = item_timeout_s + kill_grace_s
    while queue or any(w.job is not None for w in self._workers):
      now = time.monotonic()
      if now >= deadline:
        break
      for w in self._workers:
        if w.ready and w.job is None and queue:
          job_id = queue.popleft()
          try:
            w.conn.send((job_id, grader, *jobs[job_id], config, item_timeout_s))
          except (OSError, ValueError):
            queue.appendleft(job_id)
            self._on_death(w, results, details)
            continue
          w.job, w.started = job_id, time.monotonic()
      busy_until = [w.started + hard_s for w in self._workers if w.job is not None]
      wake = min([deadline, *busy_until])
      handles = {}
      for w in self._workers:
        handles[w.conn] = w
        handles[w.proc.sentinel] = w
      ready = multiprocessing.connection.wait(list(handles), timeout=max(0.0, wake - time.monotonic()))
      seen = set()
      for h in ready:
        w = handles[h]
        if id(w) in seen or not any(w is x for x in self._workers):
          continue
        seen.add(id(w))
        if w.conn.poll():
          self._handle_message(w, results, details)
        elif not w.proc.is_alive():
          self._on_death(w, results, details)
      now = time.monotonic()
      for w in list(self._workers):
        if w.job is not None and now >= w.started + hard_s:
          results[w.job], details[w.job] = ("timeout", 0.0), f"killed after {now - w.started:.2f}s"
          w.job = None
          self._replace(w)
    for w in list(self._workers):
      if w.job is not None:
        results[w.job], details[w.job] = ("deadline", 0.0), "in flight at the deadline; worker killed"
        w.job = None
        self._replace(w)
    for job_id in queue:
      results[job_id], details[job_id] = ("deadline", 0.0), "not started before the deadline"
    return results, details


@dataclasses.dataclass(frozen=True)
class BatchRewards:
  """Per-item rewards of one batch. All arrays are [N] float32, N = len(texts).

  total = format_weight * format + accuracy_weight * accuracy, and 0 wherever status != "ok".
  """

  total: np.ndarray
  format: np.ndarray
  accuracy: np.ndarray
  status: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class GradeStats:
  """Counts for one `grade_batch` call (items, not unique jobs, except `unique`)."""

  n: int
  unique: int
  ok: int
  timeouts: int
  crashes: int
  bad_gold: int
  deadline: int
  seconds: float
  worker_restarts: int
  bad_gold_examples: tuple[str, ...] = ()

  @property
  def items_per_s(self) -> float:
    return self.n / self.seconds if self.seconds > 0 else float("inf")

  def as_metrics(self, prefix: str = "rewards/") -> dict[str, float]:
    """Numbers for metrics.jsonl."""
    keys = ("n", "unique", "ok", "timeouts", "crashes", "bad_gold", "deadline", "seconds", "worker_restarts")
    return {f"{prefix}{k}": float(getattr(self, k)) for k in keys}


def _dedupe(answers: Sequence[str | None], golds: Sequence[str]) -> tuple[list[tuple[str | None, str]], list[int]]:
  index: dict[tuple[str | None, str], int] = {}
  item_to_job = [index.setdefault((a, g), len(index)) for a, g in zip(answers, golds)]
  return list(index), item_to_job


def _log_problems(statuses: Sequence[str], details: Sequence[str], golds: Sequence[str]) -> None:
  bad = [i for i, s in enumerate(statuses) if s != "ok"]
  if not bad:
    return
  counts = collections.Counter(statuses[i] for i in bad)
  first = bad[0]
  log.warning("reward grading: %s of %d items scored 0 (%s); first: item %d, %s",
              len(bad), len(statuses), dict(counts), first, details[first][:300])
  for gold in sorted({golds[i] for i in bad if statuses[i] == "bad_gold"})[:5]:
    log.error("reward grading: gold answer %r cannot be parsed", gold[:200])


def grade_batch(texts: Sequence[str], golds: Sequence[str], config: RewardConfig | None = None, *,
                pool: RewardPool | None = None) -> tuple[BatchRewards, GradeStats]:
  """Format + accuracy rewards for a batch of responses, graded in worker processes.

  Args:
    texts: N model responses (decoded completions).
    golds: N gold answers.
    config: weights, grader names, timeouts (RewardConfig).
    pool: a running RewardPool; without one, a pool is started and closed inside this call (worker
      start-up then counts against the deadline).
  Returns:
    (BatchRewards with [N] float32 arrays, GradeStats). Returns by the deadline plus the time to kill
    busy workers; never raises because of a response.
  Raises:
    ValueError: len(texts) != len(golds); or, with config.raise_on_bad_gold, golds that cannot be
      parsed (named in the message) after the whole batch is graded.
  """
  config = config or RewardConfig()
  t0 = time.monotonic()
  deadline = t0 + config.deadline_s
  if len(texts) != len(golds):
    raise ValueError(f"grade_batch got {len(texts)} texts but {len(golds)} golds")
  format_fn = registry.format_reward_fn(config.format_fn)
  if isinstance(config.accuracy_fn, str):
    registry.accuracy_grader(config.accuracy_fn)   # fail fast on a typo, before any work
  fmt = np.array([format_fn(t) for t in texts], np.float32)
  jobs, item_to_job = _dedupe([extract.extract_answer(t) for t in texts], list(golds))
  own_pool = pool is None
  pool = pool or RewardPool(config.num_workers, config.mp_context, config.worker_memory_mb)
  restarts_before = pool.restarts
  try:
    job_results, job_details = pool.run(jobs, config.accuracy_fn, config.grade,
                                        item_timeout_s=config.item_timeout_s,
                                        kill_grace_s=config.kill_grace_s, deadline=deadline)
  finally:
    restarts = pool.restarts - restarts_before
    if own_pool:
      pool.close()
  statuses = tuple(job_results[j][0] for j in item_to_job)
  ok = np.array([s == "ok" for s in statuses], bool)
  acc = np.array([job_results[j][1] for j in item_to_job], np.float32) * ok
  fmt = fmt * ok
  total = (config.format_weight * fmt + config.accuracy_weight * acc).astype(np.float32)
  details = [job_details[j] for j in item_to_job]
  counts = collections.Counter(statuses)
  bad_golds = tuple(sorted({golds[i] for i, s in enumerate(statuses) if s == "bad_gold"}))
  stats = GradeStats(n=len(texts), unique=len(jobs), ok=counts["ok"], timeouts=counts["timeout"],
                     crashes=counts["crash"], bad_gold=counts["bad_gold"], deadline=counts["deadline"],
                     seconds=time.monotonic() - t0, worker_restarts=restarts,
                     bad_gold_examples=tuple(g[:200] for g in bad_golds[:5]))
  _log_problems(statuses, details, golds)
  if bad_golds and config.raise_on_bad_gold:
    msgs = sorted({d for d, s in zip(details, statuses) if s == "bad_gold"})
    raise ValueError(f"{len(bad_golds)} gold answer(s) cannot be parsed: " + "; ".join(msgs[:5]))
  return BatchRewards(total=total, format=fmt, accuracy=acc, status=statuses), stats
