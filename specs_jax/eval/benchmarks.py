r"""Benchmark harness: prompts -> greedy or sampled responses -> extracted answers -> scores -> results JSON.

    examples = benchmarks.load_benchmark("MathVista/testmini.parquet", "mathvista")
    res = benchmarks.run_benchmark(model, params, tokenizer, examples, image_config=image_config,
                                   system_prompt=data.MM_EUREKA_SYSTEM_PROMPT, format_instruction=None,
                                   n=1, temperature=0.0, max_new_tokens=2048, batch_size=16)
    benchmarks.write_results(f"{DIR}/eval/final/mathvista.json", res)   # every response kept
    summary["eval"]["final"]["mathvista"] = benchmarks.summary_entry(res)

Prompts. The example's own messages (MathVista's `query` keeps the benchmark's hint, "Hint: Please answer
the question requiring an integer answer ..."), then:
- `system_prompt`: None keeps an example's own system message, or else the chat template's default
  ("You are a helpful assistant."); a string replaces both (RECIPE.md §5 quotes MM-EUREKA's).
- `format_instruction`: appended to the last user text after a newline (e.g. `data.SPECS_INSTRUCTION`);
  None or "" appends nothing (use it when the system prompt carries the format, as MM-EUREKA's does).

Scoring, per response (`score_responses`):
1. format_ok = `data.format_follows(text, format_spec)`; for the default spec this is exactly
   `rewards.format_reward(text) == 1`, the RL format reward.
2. extracted = `rewards.extract_answer(text)`: the last `<answer>` span, its single `\boxed{}` if any;
   without tags, a single `\boxed{}` anywhere. Several different boxes give no answer.
3. correct = `rewards.grade_answer(extracted, gold)` (choice letters, words, math-verify), with
   MathVista's `precision` as the rounding (`GradeConfig.float_rounding`) when the item has one.
   With a reward pool the same grader runs in worker processes with per-item timeouts.
4. Judge fallback (only with `judge=`, only for responses the rules scored 0): a response with no tag and no
   box at all (its last `JUDGE_TAIL_CHARS` characters are sent as the candidate), or a free-form gold
   (`Gold.kind == "text"`: synonyms and paraphrases are the judge's job). The judge's verdict replaces
   the rule score; a failed request (score None) keeps it. `judged` records which responses it decided.

Static shapes: batches of exactly `batch_size` prompts (the last one is filled with copies of its last
prompt, whose outputs are dropped), prompts and patches padded to buckets, so a benchmark compiles the
sampler once per bucket (sampling.compile_counts()).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from specs_jax import rewards, sampling
from specs_jax.data import formats as formats_lib
from specs_jax.data.sources import read_eval_benchmark
from specs_jax.data.types import Example
from specs_jax.eval import branching, metrics
from specs_jax.processing import batching, chat
from specs_jax.processing import image as image_lib
from specs_jax.processing.tokenizer import EOS_TOKEN, PAD_TOKEN
from specs_jax.rewards.extract import boxed_contents
from specs_jax.rewards.judge import Judge
from specs_jax.sampling.sampler import DEFAULT_PATCH_BUCKETS, DEFAULT_PROMPT_BUCKETS

__all__ = ["Generation", "JUDGE_TAIL_CHARS", "generate_responses", "load_benchmark", "prompt_messages",
           "run_benchmark", "score_responses", "summary_entry", "write_results"]

log = logging.getLogger(__name__)

JUDGE_TAIL_CHARS = 1000


# ---------------------------------------------------------------------------------------------- input


def load_benchmark(path: str | os.PathLike | Sequence[str | os.PathLike], style: str, *,
                   image_root: str | os.PathLike | None = None, limit: int | None = None,
                   on_error: str = "skip", keep=None) -> list[Example]:
  """Reads a MathVista / MathVerse / MathVision / MMMU / generic benchmark from local files.

  A thin wrapper over `data.read_eval_benchmark` (which documents the field mapping per style) that
  logs the reader's summary (rows read, skipped by reason) and keeps the first `limit` examples.
  """
  res = read_eval_benchmark(path, style, image_root=image_root, on_error=on_error, keep=keep)
  log.info("benchmark %s: %s", style, res.summary())
  examples = list(res.examples)
  return examples[:limit] if limit is not None else examples


def _text_of(content: Any) -> str:
  if isinstance(content, str):
    return content
  return "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")


def prompt_messages(example: Example, system_prompt: str | None, format_instruction: str | None) -> list[dict]:
  """The chat messages sent for `example` (module docstring: system prompt and format instruction rules).

  Returns a new list; the example is not modified.
  """
  messages = copy.deepcopy(list(example.messages))
  if system_prompt is not None:
    messages = [m for m in messages if m.get("role") != "system"]
    messages.insert(0, {"role": "system", "content": system_prompt})
  if format_instruction:
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
      raise ValueError(f"example {example.id!r} has no user message to append the format instruction to")
    msg = messages[users[-1]]
    content = msg["content"]
    if isinstance(content, str):
      msg["content"] = f"{content}\n{format_instruction}" if content else format_instruction
    else:
      texts = [p for p in content if isinstance(p, Mapping) and p.get("type") == "text"]
      if texts:
        last = texts[-1]
        last["text"] = f"{last['text']}\n{format_instruction}" if last["text"] else format_instruction
      else:
        content.append({"type": "text", "text": format_instruction})
  return messages


def _token_id(tokenizer, token: str) -> int:
  i = tokenizer.convert_tokens_to_ids(token)
  if i is None or i == tokenizer.unk_token_id:
    raise ValueError(f"tokenizer has no {token!r} token")
  return int(i)


# ----------------------------------------------------------------------------------------- generation


@dataclasses.dataclass
class Generation:
  """Responses for P prompts, n each. Lists are [P][n]; rbf fields are set when it was computed."""

  texts: list[list[str]]
  num_tokens: list[list[int]]
  finished: list[list[bool]]
  prompts: list[str]                       # the user text actually sent (instruction included)
  rbf_total: float = 0.0
  rbf_count: int = 0
  seconds: float = 0.0

  @property
  def rbf(self) -> float | None:
    return self.rbf_total / self.rbf_count if self.rbf_count else None


def _encode_batch(tokenizer, batch: Sequence[Example], batch_size: int, pad: int, image_config, system_prompt,
                  format_instruction, prompt_buckets, patch_buckets) -> tuple[dict[str, Any], list[str]]:
  """Encodes and collates one batch, filled up to batch_size with copies of its last prompt.

  Returns:
    (collate_prompts' arrays plus "pv" [Np, 1176] (the real patches only) and "thw" [n, 3], both None
    without images; the user text of each real prompt).
  """
  encoded, prompts = [], []
  for ex in batch:
    messages = prompt_messages(ex, system_prompt, format_instruction)
    prompts.append(_text_of(next(m for m in reversed(messages) if m.get("role") == "user")["content"]))
    try:
      encoded.append(chat.encode_prompt(tokenizer, messages, ex.load_images(), image_config))
    except ValueError as e:
      raise ValueError(f"example {ex.id!r}: cannot build its prompt: {e}") from e
  encoded += [encoded[-1]] * (batch_size - len(encoded))
  col = batching.collate_prompts(encoded, pad, prompt_buckets, patch_buckets)
  has_images = bool(col["patch_valid"].any())
  col["pv"] = col["pixel_values"][col["patch_valid"]] if has_images else None
  col["thw"] = col["image_grid_thw"] if has_images else None
  return col, prompts


def generate_responses(model, params, tokenizer, examples: Sequence[Example], *,
                       image_config: image_lib.ImageConfig | None, system_prompt: str | None,
                       format_instruction: str | None, max_new_tokens: int, batch_size: int, n: int = 1,
                       temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                       rbf_top_p: float | None = None,
                       prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS,
                       patch_buckets: Sequence[int] = DEFAULT_PATCH_BUCKETS) -> Generation:
  """Generates n responses per example, in batches of `batch_size` prompts (B·n sequences per call).

  Args:
    model, params: a `qwen2_5_vl` model and its params.
    tokenizer: the model directory's tokenizer (chat template, Qwen special tokens).
    examples: the prompts (`data.Example`).
    image_config: image pixel limits (None: the Qwen2.5-VL hub defaults).
    system_prompt, format_instruction: see `prompt_messages`.
    max_new_tokens: generation budget per response; EOS is `<|im_end|>`.
    batch_size: prompts per sampler call (static: a short last batch is filled with copies).
    n: responses per prompt (n > 1 needs temperature > 0).
    temperature, top_p, top_k: sampling settings (temperature 0 = greedy).
    seed: PRNG seed; batch i uses fold_in(key(seed), i).
    rbf_top_p: if set, also compute the rollout branching factor of the responses at this top_p, with
      one extra forward per batch and sample index (`branching.rbf_from_model`) at `temperature`
      (1.0 when greedy).
    prompt_buckets, patch_buckets: static padded lengths for prompts and vision patches.
  Returns:
    Generation with texts [P][n] (EOS dropped, special tokens skipped).
  """
  if n < 1 or batch_size < 1 or max_new_tokens < 1:
    raise ValueError(f"need n, batch_size, max_new_tokens >= 1; got {n}, {batch_size}, {max_new_tokens}")
  if n > 1 and temperature == 0.0:
    raise ValueError(f"n={n} samples with temperature=0 would be {n} copies of the greedy response; "
                     "set temperature > 0 for pass@k")
  image_config = image_config or image_lib.ImageConfig()
  eos = _token_id(tokenizer, EOS_TOKEN)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _token_id(tokenizer, PAD_TOKEN)
  key = jax.random.key(seed)
  gen = Generation([], [], [], [])
  t0 = time.monotonic()
  n_batches = math.ceil(len(examples) / batch_size)
  for bi in range(n_batches):
    batch = examples[bi * batch_size:(bi + 1) * batch_size]
    col, prompts = _encode_batch(tokenizer, batch, batch_size, pad, image_config, system_prompt, format_instruction,
                                 prompt_buckets, patch_buckets)
    gen.prompts += prompts
    out = sampling.generate(model, params, col["input_ids"], col["attention_mask"], pixel_values=col["pv"],
                            image_grid_thw=col["thw"], max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p, top_k=top_k, eos_token_id=eos, pad_token_id=pad,
                            rng=jax.random.fold_in(key, bi), n=n, prompt_buckets=prompt_buckets,
                            patch_buckets=patch_buckets)
    texts = sampling.decode_responses(tokenizer, out)
    for i in range(len(batch)):
      rows = range(i * n, (i + 1) * n)                        # rows are prompt-major: row = i * n + j
      gen.texts.append([texts[r] for r in rows])
      gen.num_tokens.append([int(out.lengths[r]) for r in rows])
      gen.finished.append([bool(out.finished[r]) for r in rows])
    if rbf_top_p is not None:
      for j in range(n):                                      # sample j of every prompt: rows j::n
        lengths = out.lengths[j::n].copy()
        lengths[len(batch):] = 0                              # filler rows do not count
        r = branching.rbf_from_model(model, params, col["input_ids"], col["attention_mask"], out.tokens[j::n],
                                     lengths, pixel_values=col["pv"], image_grid_thw=col["thw"], top_p=rbf_top_p,
                                     temperature=temperature if temperature > 0 else 1.0,
                                     patch_buckets=patch_buckets)
        gen.rbf_total += r.total
        gen.rbf_count += r.count
    log.info("eval: batch %d/%d done (%d prompts x %d samples, %.1fs)", bi + 1, n_batches, len(batch), n,
             time.monotonic() - t0)
  gen.seconds = time.monotonic() - t0
  return gen


# -------------------------------------------------------------------------------------------- scoring


def _grade_config(example: Example, base: rewards.GradeConfig, use_precision: bool) -> rewards.GradeConfig:
  precision = example.meta.get("precision") if use_precision else None
  if isinstance(precision, int) and not isinstance(precision, bool) and precision >= 0:
    return dataclasses.replace(base, float_rounding=precision)
  return base


def _judge_candidate(text: str, extracted: str | None, gold_kind: str) -> str | None:
  """What the judge is asked about for a response the rules scored 0 (module docstring), or None."""
  if extracted is None:
    if rewards.answer_span(text) is not None or boxed_contents(text):
      return None                            # tagged or boxed but unreadable/ambiguous: no second chance
    tail = text[-JUDGE_TAIL_CHARS:].strip()
    return tail or None
  return extracted if gold_kind == "text" else None


def score_responses(examples: Sequence[Example], responses: Sequence[Sequence[str]], *,
                    format_spec: Mapping[str, str] = formats_lib.DEFAULT_FORMAT,
                    grade_config: rewards.GradeConfig | None = None, use_precision: bool = True,
                    judge: Judge | None = None,
                    pool: rewards.RewardPool | None = None) -> list[dict[str, Any]]:
  """Scores n responses per example (module docstring, "Scoring").

  Args:
    examples: P examples (gold, meta["precision"], meta["question"]).
    responses: [P][n] response texts.
    format_spec: the output format the prompt asked for (`data.formats`), for examples whose
      meta["format"] does not name their own (synthetic OOD-format examples do; for them the answer
      is extracted with that format's rule, e.g. the "Answer:" line or the JSON field).
    grade_config: tolerances and guards (default `GradeConfig()`).
    use_precision: round floats to the example's meta["precision"] decimals when it has one.
    judge: optional `rewards.make_judge(...)` fallback.
    pool: optional running `rewards.RewardPool`: rule grading in worker processes with timeouts.
  Returns:
    P dicts {"extracted": [n], "correct": [n] bool, "format_ok": [n] bool, "judged": [n] bool,
    "error": str | None (an unparseable gold: every response scores 0)}.
  """
  if len(examples) != len(responses):
    raise ValueError(f"{len(examples)} examples but {len(responses)} response lists")
  base = grade_config or rewards.GradeConfig()
  configs = [_grade_config(ex, base, use_precision) for ex in examples]
  out: list[dict[str, Any]] = []
  kinds: list[str | None] = []
  for ex, texts, cfg in zip(examples, responses, configs):
    try:
      kinds.append(rewards.parse_gold(ex.gold, cfg).kind)
      error = None
    except rewards.GoldError as e:
      kinds.append(None)
      error = str(e)
      log.error("eval: %s: %s", ex.id, e)
    spec = ex.meta.get("format") or format_spec
    own = not formats_lib.is_default_format(spec)
    out.append({"extracted": [formats_lib.extract_answer_for_format(t, spec) if own else rewards.extract_answer(t)
                              for t in texts],
                "correct": [False] * len(texts),
                "format_ok": [bool(formats_lib.format_follows(t, spec)) for t in texts],
                "judged": [False] * len(texts), "error": error})
  _rule_grade(examples, responses, configs, kinds, out, pool)
  if judge is not None:
    _judge_grade(examples, responses, kinds, out, judge)
  return out


def _rule_grade(examples, responses, configs, kinds, out, pool) -> None:
  if pool is None:
    for ex, texts, cfg, kind, rec in zip(examples, responses, configs, kinds, out):
      if kind is not None:
        rec["correct"] = [rewards.grade_answer(a, ex.gold, cfg) == 1.0 for a in rec["extracted"]]
    return
  groups: dict[rewards.GradeConfig, list[tuple[int, int]]] = {}
  for i, (texts, cfg, kind) in enumerate(zip(responses, configs, kinds)):
    if kind is not None:
      groups.setdefault(cfg, []).extend((i, j) for j in range(len(texts)))
  for cfg, items in groups.items():
    batch, stats = rewards.grade_batch([responses[i][j] for i, j in items], [examples[i].gold for i, _ in items],
                                       rewards.RewardConfig(grade=cfg), pool=pool)
    for (i, j), acc in zip(items, batch.accuracy):
      out[i]["correct"][j] = bool(acc == 1.0)
    if stats.ok < stats.n:
      log.warning("eval: %d of %d responses not graded (timeouts %d, crashes %d, deadline %d); scored 0",
                  stats.n - stats.ok, stats.n, stats.timeouts, stats.crashes, stats.deadline)


def _judge_grade(examples, responses, kinds, out, judge) -> None:
  todo = []
  for i, (ex, texts, kind, rec) in enumerate(zip(examples, responses, kinds, out)):
    if kind is None:
      continue
    for j, text in enumerate(texts):
      if not rec["correct"][j] and (cand := _judge_candidate(text, rec["extracted"][j], kind)) is not None:
        todo.append((i, j, cand))
  if not todo:
    return
  verdicts = judge.grade_answers([examples[i].question for i, _, _ in todo],
                                 [f"<answer>{cand}</answer>" for _, _, cand in todo],
                                 [examples[i].gold for i, _, _ in todo])
  for (i, j, _), v in zip(todo, verdicts):
    if v.score is not None:
      out[i]["correct"][j] = v.score == 1.0
      out[i]["judged"][j] = True


# -------------------------------------------------------------------------------------------- results


def _mean(rows: Sequence[Sequence[float]]) -> float:
  return float(np.mean([np.mean(r) for r in rows])) if rows else 0.0


def run_benchmark(model, params, tokenizer, examples: Sequence[Example], *,
                  image_config: image_lib.ImageConfig | None, system_prompt: str | None,
                  format_instruction: str | None, n: int = 1, temperature: float = 0.0, max_new_tokens: int,
                  batch_size: int, judge: Judge | None = None, name: str = "benchmark",
                  top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                  format_spec: Mapping[str, str] = formats_lib.DEFAULT_FORMAT,
                  grade_config: rewards.GradeConfig | None = None, use_precision: bool = True,
                  pool: rewards.RewardPool | None = None, ks: Sequence[int] | None = None,
                  rbf_top_p: float | None = None,
                  prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS,
                  patch_buckets: Sequence[int] = DEFAULT_PATCH_BUCKETS) -> dict[str, Any]:
  """Generates, scores and aggregates one benchmark (module docstring).

  Args (beyond `generate_responses` and `score_responses`):
    name: the benchmark's name in the results.
    ks: the k of pass@k when n > 1 (default `metrics.default_ks(n)`: 1, 2, 4, ..., n).
  Returns:
    {"benchmark", "settings", "n" (examples), "n_samples", "accuracy" (mean over examples of the fraction
    of correct samples; for n > 1 this is pass@1), "format_rate", "extraction_rate", "truncation_rate"
    (responses that hit max_new_tokens), "mean_response_tokens", "judged" (responses the judge decided),
    "bad_gold" (examples whose gold cannot be parsed), "by_category" ({category: {"accuracy", "n"}}),
    "pass@k" ({str(k): rate}, n > 1 only), "rbf" (with rbf_top_p), "seconds", "records"}.
    Each record: id, question, prompt, gold, answer_type, category, responses, extracted, correct,
    format_ok, judged, finished, num_tokens, accuracy (its fraction correct), error.
  """
  if not examples:
    raise ValueError(f"benchmark {name!r} has no examples")
  t0 = time.monotonic()
  gen = generate_responses(model, params, tokenizer, examples, image_config=image_config,
                           system_prompt=system_prompt, format_instruction=format_instruction,
                           max_new_tokens=max_new_tokens, batch_size=batch_size, n=n, temperature=temperature,
                           top_p=top_p, top_k=top_k, seed=seed, rbf_top_p=rbf_top_p,
                           prompt_buckets=prompt_buckets, patch_buckets=patch_buckets)
  scores = score_responses(examples, gen.texts, format_spec=format_spec, grade_config=grade_config,
                           use_precision=use_precision, judge=judge, pool=pool)
  records = []
  for i, (ex, sc) in enumerate(zip(examples, scores)):
    records.append({
        "id": ex.id, "question": ex.question, "prompt": gen.prompts[i], "gold": ex.gold,
        "answer_type": ex.answer_type, "category": ex.meta.get("category"), "responses": gen.texts[i],
        "extracted": sc["extracted"], "correct": sc["correct"], "format_ok": sc["format_ok"],
        "judged": sc["judged"], "finished": gen.finished[i], "num_tokens": gen.num_tokens[i],
        "accuracy": float(np.mean(sc["correct"])), "error": sc["error"],
    })
  correct = [r["correct"] for r in records]
  res: dict[str, Any] = {
      "benchmark": name,
      "settings": {"n": n, "temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed,
                   "max_new_tokens": max_new_tokens, "batch_size": batch_size, "system_prompt": system_prompt,
                   "format_instruction": format_instruction, "format_spec": dict(format_spec),
                   "use_precision": use_precision, "judge": None if judge is None else repr(judge)},
      "n": len(records),
      "n_samples": n,
      "accuracy": _mean(correct),
      "format_rate": _mean([r["format_ok"] for r in records]),
      "extraction_rate": _mean([[a is not None for a in r["extracted"]] for r in records]),
      "truncation_rate": _mean([[not f for f in r["finished"]] for r in records]),
      "mean_response_tokens": _mean(gen.num_tokens),
      "judged": int(sum(sum(r["judged"]) for r in records)),
      "bad_gold": int(sum(r["error"] is not None for r in records)),
      "by_category": metrics.accuracy_by_category(records),
  }
  if n > 1:
    res["pass@k"] = {str(k): v for k, v in metrics.mean_pass_at_k(correct, ks or metrics.default_ks(n)).items()}
  if gen.rbf is not None:
    res["rbf"] = gen.rbf
  res["seconds"] = time.monotonic() - t0
  res["records"] = records
  log.info("eval %s: accuracy %.1f%%, format %.1f%% over %d examples x %d samples (%.1fs)", name,
           100 * res["accuracy"], 100 * res["format_rate"], len(records), n, res["seconds"])
  return res


def summary_entry(results: Mapping[str, Any]) -> dict[str, Any]:
  """The part of `run_benchmark`'s results that goes into summary.json["eval"][checkpoint][split]
  (everything but the per-item records and the settings)."""
  return {k: v for k, v in results.items() if k not in ("records", "settings")}


def _jsonable(x: Any) -> Any:
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return x


def write_results(path: str | os.PathLike, results: Mapping[str, Any]) -> None:
  """Writes results as JSON (UTF-8, indented), atomically; creates the parent directory."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    json.dump(_jsonable(results), f, ensure_ascii=False, indent=1, allow_nan=False)
  os.replace(tmp, path)
