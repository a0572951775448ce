"""Output-format specs: the instruction a prompt gives, whether a response follows it, and its answer.

A format spec is a small JSON-able dict, stored in `Example.meta["format"]`:

    {"kind": "tags", "think": "think", "answer": "answer"}   the SPECS / MM-EUREKA default (in-distribution)
    {"kind": "tags", "think": "reasoning", "answer": "final"} same structure, other tag names (OOD)
    {"kind": "answer_line"}                                   reasoning, then a last line "Answer: X" (OOD)
    {"kind": "json"}                                          a JSON object {"reasoning": ..., "answer": ...} (OOD)
    {"kind": "boxed"}                                         free text ending with its one \\boxed{X} (OOD)

The default-tag rule is MM-EUREKA's `format_reward_func` (RECIPE.md §5): exactly one each of <think>,
</think>, <answer>, </answer>, and `<think>(.+?)</think>\\s*<answer>.+?</answer>` somewhere (DOTALL), so
text before <think> and after </answer> is allowed, with one deliberate difference shared with
`specs_jax.rewards.format` (so that the evaluated format rate is the RL format reward): each content must
contain a non-whitespace character, where upstream's `.+?` also accepts a lone space. Other tag names use
the same rule with their names.

Pure Python (re, json): the evaluation of format-following on every ID and OOD split uses this module.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from specs_jax.data.types import last_boxed

FormatSpec = Mapping[str, str]

DEFAULT_FORMAT: dict[str, str] = {"kind": "tags", "think": "think", "answer": "answer"}

# The out-of-distribution formats of the generalisation-factor evaluation: same tasks, other instructions.
OOD_FORMATS: tuple[dict[str, str], ...] = (
    {"kind": "tags", "think": "reasoning", "answer": "final"},
    {"kind": "tags", "think": "analysis", "answer": "result"},
    {"kind": "answer_line"},
    {"kind": "json"},
    {"kind": "boxed"},
)

# MM-EUREKA's Qwen system prompt (eval/mathvista/evaluate_mathvista.py), quoted in RECIPE.md §5. The doubled
# backslashes (`\\boxed`) are verbatim: upstream writes "\\\\boxed" in a Python string.
MM_EUREKA_SYSTEM_PROMPT = (
    "Solve the question. The user asks a question, and you solves it. You first thinks about the reasoning "
    "process in the mind and then provides the user with the answer. The answer is in latex format and "
    "wrapped in $...$. The final answer must be wrapped using the \\\\boxed{} command. The reasoning process "
    "and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> Since $1+1=2$, so the answer is $2$. </think><answer> The answer is $\\\\boxed{2}$ </answer>, "
    "which means assistant's output should start with <think> and end with </answer>.")

# The instruction fragment shown in the SPECS method figure, completed with the answer convention of the
# SPECS outputs (`<answer> The answer is $\boxed{X}$</answer>`).
SPECS_INSTRUCTION = (
    "You FIRST think about the reasoning process and then provide the final answer. The response need to "
    "enclose within <think> </think> and <answer> </answer> tags, i.e., <think> reasoning process here "
    "</think>\n<answer> The answer is $\\boxed{answer here}$</answer>.")

_KINDS = ("tags", "answer_line", "json", "boxed")
_TAG_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def validate_format_spec(spec: FormatSpec) -> dict[str, str]:
  """Returns a plain-dict copy of `spec`, or raises ValueError saying what is wrong with it."""
  if not isinstance(spec, Mapping) or "kind" not in spec:
    raise ValueError(f"format spec must be a mapping with a 'kind' key, got {spec!r}")
  kind = spec["kind"]
  if kind not in _KINDS:
    raise ValueError(f"unknown format kind {kind!r}; expected one of {_KINDS}")
  if kind == "tags":
    for key in ("think", "answer"):
      name = spec.get(key)
      if not isinstance(name, str) or not _TAG_NAME_RE.fullmatch(name):
        raise ValueError(f"tags format needs a tag name for {key!r} ([A-Za-z][A-Za-z0-9_-]*), got {name!r}")
    if spec["think"] == spec["answer"]:
      raise ValueError(f"tags format needs two different tag names, got {spec!r}")
  extra = set(spec) - {"kind", "think", "answer"}
  if extra or (kind != "tags" and set(spec) != {"kind"}):
    raise ValueError(f"unexpected keys {sorted(set(spec) - {'kind'})} for format kind {kind!r}")
  return dict(spec)


def is_default_format(spec: FormatSpec | None) -> bool:
  return spec is not None and dict(spec) == DEFAULT_FORMAT


def format_name(spec: FormatSpec) -> str:
  """A short stable name: "tags:think/answer", "answer_line", "json", "boxed"."""
  spec = validate_format_spec(spec)
  if spec["kind"] == "tags":
    return f"tags:{spec['think']}/{spec['answer']}"
  return spec["kind"]


def format_instruction(spec: FormatSpec) -> str:
  """The instruction appended to a question to ask for this output format."""
  spec = validate_format_spec(spec)
  kind = spec["kind"]
  if kind == "tags":
    if is_default_format(spec):
      return SPECS_INSTRUCTION
    t, a = spec["think"], spec["answer"]
    return (f"First think about the reasoning process, then give the final answer. Enclose the reasoning "
            f"within <{t}> </{t}> tags and the final answer within <{a}> </{a}> tags, i.e., <{t}> reasoning "
            f"process here </{t}>\n<{a}> final answer here </{a}>.")
  if kind == "answer_line":
    return ("Explain your reasoning step by step. Then write the final answer alone on the last line, in the "
            "form \"Answer: <final answer>\".")
  if kind == "json":
    return ("Respond with a single JSON object and nothing else. It must have exactly two keys: \"reasoning\" "
            "(your step-by-step reasoning, a string) and \"answer\" (the final answer).")
  return "Reason step by step, and end your response with the final answer, written once inside \\boxed{}."


def render_response(reasoning: str, answer: str, spec: FormatSpec) -> str:
  """Writes a response that follows `spec`: the inverse of `extract_answer_for_format`.

  The default tags give SPECS's `<think>...</think>\\n<answer> The answer is $\\boxed{X}$</answer>`.
  """
  spec = validate_format_spec(spec)
  kind = spec["kind"]
  if kind == "tags":
    t, a = spec["think"], spec["answer"]
    if is_default_format(spec):
      return f"<{t}>{reasoning}</{t}>\n<{a}> The answer is $\\boxed{{{answer}}}$</{a}>"
    return f"<{t}>{reasoning}</{t}>\n<{a}>{answer}</{a}>"
  if kind == "answer_line":
    return f"{reasoning}\nAnswer: {answer}"
  if kind == "json":
    return json.dumps({"reasoning": reasoning, "answer": answer}, ensure_ascii=False)
  return f"{reasoning} So the final answer is $\\boxed{{{answer}}}$."


# ----------------------------------------------------------------------------------------------------------
# Checking


def _tags_follow(text: str, think: str, answer: str) -> bool:
  tags = (f"<{think}>", f"</{think}>", f"<{answer}>", f"</{answer}>")
  # Exactly one of each (MM-EUREKA's lookaheads `(?=(?:.*<t>){1})` and `(?!.*<t>.*<t>)`) ...
  if any(text.count(tag) != 1 for tag in tags):
    return False
  t0, t1, a0, a1 = (text.index(tag) for tag in tags)
  think_body = text[t0 + len(tags[0]):t1]
  answer_body = text[a0 + len(tags[2]):a1]
  between = text[t1 + len(tags[1]):a0]
  # ... in order, with only whitespace between </think> and <answer>, and non-blank contents.
  return (t0 < t1 < a0 < a1 and t1 >= t0 + len(tags[0]) and a1 >= a0 + len(tags[2]) and not between.strip()
          and bool(think_body.strip()) and bool(answer_body.strip()))


_ANSWER_LINE_RE = re.compile(r"\s*Answer:[ \t]*(\S.*?)\s*")


def _answer_line_follows(text: str) -> bool:
  lines = [ln for ln in text.splitlines() if ln.strip()]
  if len(lines) < 2:  # reasoning first, then the answer line
    return False
  answer_lines = [ln for ln in lines if _ANSWER_LINE_RE.fullmatch(ln)]
  return len(answer_lines) == 1 and _ANSWER_LINE_RE.fullmatch(lines[-1]) is not None


def _json_object(text: str) -> dict | None:
  try:
    obj = json.loads(text)
  except (json.JSONDecodeError, RecursionError):
    return None
  return obj if isinstance(obj, dict) else None


def _json_follows(text: str) -> bool:
  obj = _json_object(text.strip())
  if obj is None or set(obj) != {"reasoning", "answer"}:
    return False
  reasoning, answer = obj["reasoning"], obj["answer"]
  if not isinstance(reasoning, str) or not reasoning.strip():
    return False
  if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
    return False
  return bool(str(answer).strip())


_AFTER_BOXED_RE = re.compile(r"[\s$.]*(\\\)|\\\])?[\s$.]*")


def _boxed_follows(text: str) -> bool:
  if text.count("\\boxed{") != 1:
    return False
  content = last_boxed(text)
  if content is None or not content.strip():
    return False
  start = text.index("\\boxed{")
  # Only closing math delimiters and a final period may follow; so a tagged <answer> ... </answer>
  # response, whose \boxed{} is followed by </answer>, does not count as following this format.
  after = text[start + len("\\boxed{") + len(content) + 1:]
  return _AFTER_BOXED_RE.fullmatch(after) is not None


def format_follows(text: str, format_spec: FormatSpec = DEFAULT_FORMAT) -> bool:
  """Whether a response follows the output format `format_spec` (strict; see the module docstring).

  - tags: MM-EUREKA's rule with the spec's tag names, contents non-blank (module docstring).
  - answer_line: at least one line of reasoning, and exactly one line "Answer: X" (X non-empty), which is
    the last non-empty line.
  - json: the whole response (surrounding whitespace aside) is a JSON object with exactly the keys
    "reasoning" (non-empty string) and "answer" (non-empty string or number). No code fences.
  - boxed: exactly one `\\boxed{...}`, closed, with non-empty content, and at the end of the response
    (only `$`, `\\)`, `\\]`, periods and whitespace after it).
  """
  spec = validate_format_spec(format_spec)
  kind = spec["kind"]
  if kind == "tags":
    return _tags_follow(text, spec["think"], spec["answer"])
  if kind == "answer_line":
    return _answer_line_follows(text)
  if kind == "json":
    return _json_follows(text)
  return _boxed_follows(text)


# ----------------------------------------------------------------------------------------------------------
# Extraction

_ANSWER_IS_RE = re.compile(r"^(the\s+)?(final\s+)?answer\s+is\s*:?\s*", re.IGNORECASE)


def clean_answer(s: str) -> str:
  """Final-answer cleanup: the last \\boxed{} if any, else drop "The answer is", $...$ and a final period."""
  boxed = last_boxed(s)
  if boxed is not None:
    s = boxed
  s = s.strip()
  s = _ANSWER_IS_RE.sub("", s)
  s = s.strip()
  if s.endswith("."):
    s = s[:-1].rstrip()
  for left, right in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
    if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
      s = s[len(left):len(s) - len(right)].strip()
  return s


def extract_answer_for_format(text: str, format_spec: FormatSpec = DEFAULT_FORMAT) -> str | None:
  """The final answer a response gives in the slot its format defines, cleaned; None if there is none.

  Lenient where `format_follows` is strict (so accuracy can be scored separately from format):
  - tags: the content of the last <answer>...</answer>; without a closing tag, the text after the last
    <answer> (MM-EUREKA's fallback). Inside it, the last \\boxed{} wins.
  - answer_line: the last line that starts with "Answer:".
  - json: the "answer" field of the JSON object (also inside a ```json fence).
  - boxed: the last \\boxed{} content.
  """
  spec = validate_format_spec(format_spec)
  kind = spec["kind"]
  raw: str | None = None
  if kind == "tags":
    a = spec["answer"]
    closed = re.findall(f"<{a}>(.*?)</{a}>", text, re.DOTALL)
    if closed:
      raw = closed[-1]
    elif f"<{a}>" in text:
      raw = text.rsplit(f"<{a}>", 1)[1]
  elif kind == "answer_line":
    for line in reversed(text.splitlines()):
      m = _ANSWER_LINE_RE.fullmatch(line)
      if m:
        raw = m.group(1)
        break
  elif kind == "json":
    stripped = text.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", stripped, re.DOTALL)
    obj = _json_object(fence.group(1) if fence else stripped)
    if obj is not None and "answer" in obj and not isinstance(obj["answer"], (dict, list, type(None), bool)):
      raw = str(obj["answer"])
  else:
    raw = last_boxed(text)
  if raw is None:
    return None
  answer = clean_answer(raw)
  return answer or None


def response_parts(text: str, format_spec: FormatSpec = DEFAULT_FORMAT) -> dict[str, Any]:
  """{"follows": bool, "answer": str | None} in one call, for evaluation loops."""
  return {"follows": format_follows(text, format_spec), "answer": extract_answer_for_format(text, format_spec)}
