r"""Answer extraction from model responses: pure string functions, linear time, nothing is evaluated.

The responses look like (RECIPE.md §5, the SPECS project page):

  <think> reasoning ... </think>
  <answer> The answer is $\boxed{X}$</answer>

Conventions:
- The answer span is the text after the LAST `<answer>`, up to the first `</answer>` after it (or the
  end of the text when it is never closed). This is MM-EUREKA's fallback order, made explicit.
- The final answer is the content of the `\boxed{}` in the span (escaped braces `\{ \}` do not count
  as nesting). Several boxes with different contents are ambiguous and give no answer: a response
  must not be able to list candidates and let the grader pick the right one.
- Without a box, the final answer is the span with a leading "The answer is" / "Answer:" removed and
  outer `$…$`, `\(…\)`, `\[…\]`, `**…**` and a trailing full stop stripped.
- Without an `<answer>` tag, a single `\boxed{}` anywhere in the text is the final answer; otherwise
  there is none (a bare sentence is not graded).
"""

from __future__ import annotations

import re
import unicodedata

ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# One token per match, so the scan is a single linear pass even over 1 MB of braces.
_BOX_TOKENS = re.compile(r"\\(?:boxed|fbox)\s*\{|\\.|[{}]", re.DOTALL)
_ANCHOR = re.compile(
    r"(?i)\b(?:final\s+answer|correct\s+answer|correct\s+option|correct\s+choice|answer)"
    r"\s*(?:(?:is|would\s+be|should\s+be)\b\s*:?|:|=)\s*")
_TEXT_COMMANDS = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mathit|mbox|operatorname)\s*\{([^{}]*)\}")
_OUTER_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**"))
_LEADING_CHOICE_WORDS = re.compile(
    r"(?i)^(?:(?:so|thus|therefore|hence)\s*,?\s*)?(?:the\s+)?(?:final\s+|correct\s+|right\s+|best\s+)?"
    r"(?:answer|option|choice)\s*(?:is|:|=)?\s*(?::\s*)?")


def answer_span(text: str) -> str | None:
  """Returns the text inside the last `<answer>` tag (see module docstring), or None without one."""
  start = text.rfind(ANSWER_OPEN)
  if start == -1:
    return None
  start += len(ANSWER_OPEN)
  end = text.find(ANSWER_CLOSE, start)
  return text[start:] if end == -1 else text[start:end]


def think_span(text: str) -> str | None:
  """Returns the text inside the first `<think>…</think>`, or None when the pair is missing."""
  start = text.find(THINK_OPEN)
  if start == -1:
    return None
  start += len(THINK_OPEN)
  end = text.find(THINK_CLOSE, start)
  return None if end == -1 else text[start:end]


def boxed_contents(text: str) -> list[str]:
  r"""Contents of the outermost `\boxed{…}` / `\fbox{…}` groups, left to right.

  Nested boxes count once (the outer one); an unclosed box is ignored. `\boxed 5` (no braces) is
  read as the next whitespace-delimited token.
  """
  out: list[str] = []
  depth = 0              # brace depth inside the current outermost box; 0 = not in a box
  box_start = -1
  for m in _BOX_TOKENS.finditer(text):
    tok = m.group()
    if tok.startswith(("\\boxed", "\\fbox")):
      if depth == 0:
        box_start = m.end()
      depth += 1
    elif tok == "{":
      if depth:
        depth += 1
    elif tok == "}":
      if depth:
        depth -= 1
        if depth == 0:
          out.append(text[box_start:m.start()])
  if not out and depth == 0:
    m = re.search(r"\\boxed\s+([^\s${}]+)", text)
    if m:
      out.append(m.group(1))
  return out


def strip_wrappers(s: str) -> str:
  r"""Strips whitespace, a trailing full stop and outer `$…$`, `\(…\)`, `\[…\]`, `**…**` (repeatedly)."""
  prev = None
  while prev != s:
    prev = s
    s = s.strip()
    if s.endswith(".") and not s.endswith(".."):
      s = s[:-1].rstrip()
    for left, right in _OUTER_WRAPPERS:
      if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
        inner = s[len(left):len(s) - len(right)]
        if left != "$" or "$" not in inner:       # "$1$ and $2$" is two formulas, not one
          s = inner
          break
  return s


def _after_last_anchor(span: str) -> str:
  last = None
  for m in _ANCHOR.finditer(span):
    if m.end() < len(span):
      last = m
  return span[last.end():] if last is not None else span


def extract_answer(text: str) -> str | None:
  r"""The final answer string of a response, or None.

  Examples:
    "<think>…</think><answer> The answer is $\boxed{\frac{1}{2}}$</answer>" -> "\frac{1}{2}"
    "<answer>Answer: (B) 45°</answer>"                                    -> "(B) 45°"
    "<answer>\boxed{3} or \boxed{4}</answer>"                              -> None (ambiguous)
    "no tags, just 42"                                                     -> None
  """
  span = answer_span(text)
  boxes = boxed_contents(span if span is not None else text)
  distinct = list(dict.fromkeys(b.strip() for b in boxes))
  if len(distinct) == 1:
    ans = strip_wrappers(distinct[0])
    return ans or None
  if len(distinct) > 1 or span is None:
    return None
  ans = strip_wrappers(_after_last_anchor(strip_wrappers(span)))
  return ans or None


def unwrap_text_commands(s: str) -> str:
  r"""`\text{B}` -> `B`, `\mathrm{cm}` -> `cm` (one level, innermost groups first)."""
  for _ in range(4):
    new = _TEXT_COMMANDS.sub(r"\1", s)
    if new == s:
      break
    s = new
  return s


def normalize_unicode(s: str) -> str:
  """NFKC (full-width digits, ligatures) plus the math signs NFKC leaves alone (− × ÷ °)."""
  s = unicodedata.normalize("NFKC", s)
  return (s.replace("\u2212", "-").replace("\u00d7", "\\times ").replace("\u00f7", "\\div ")
          .replace("\u00b0", "^\\circ").replace("\u2009", " ").replace("\u00a0", " "))


def normalize_text(s: str) -> str:
  """Lower-case words for free-form comparison: unicode-normalised, LaTeX text commands unwrapped,
  punctuation dropped, whitespace collapsed ("The Red cube." -> "the red cube")."""
  s = unwrap_text_commands(unicodedata.normalize("NFKC", s)).casefold()
  s = re.sub(r"[^\w\s]", " ", s)
  return " ".join(s.split())


def parse_choice_gold(gold: str, letters: str) -> tuple[str, str | None] | None:
  r"""Reads a multiple-choice gold: "B", "(b)", "B.", "\boxed{B}", "$\text{B}$", or "(B) 45°".

  Returns:
    (letter, option_text or None), letter upper-case; None when the gold is not a choice.
  """
  s = gold.strip()
  boxes = boxed_contents(s)
  if len(boxes) == 1:
    s = boxes[0]
  s = strip_wrappers(unwrap_text_commands(s))
  m = re.fullmatch(r"\(?([A-Za-z])\)?\.?", s)
  if m and m.group(1).upper() in letters:
    return m.group(1).upper(), None
  m = re.fullmatch(r"\(?([A-Z])[).:]\s*(\S.*)", s, re.DOTALL)
  if m and m.group(1) in letters:
    return m.group(1), m.group(2).strip()
  return None


def choice_letter(answer: str, letters: str) -> str | None:
  """The option letter an answer commits to, or None when there is none or several.

  Accepted: "D", "(d)", "D.", "The answer is D", "Answer: (B)", "option C", "B. 45°", "(B) 45",
  "\\text{C}". Ambiguous ("A or B", "(A) and (C)") gives None. A bare upper-case letter inside a
  sentence counts only when it is the only option letter there ("I pick C" -> "C").
  """
  s = strip_wrappers(unwrap_text_commands(answer))
  s = strip_wrappers(_LEADING_CHOICE_WORDS.sub("", s, count=1))
  cls = f"[{letters}{letters.lower()}]"
  m = re.fullmatch(rf"\(?({cls})\)?", s)
  if m:
    return m.group(1).upper()
  m = re.match(rf"\(?({cls})(?:\)|\.|:)\s*(\S.*)?$", s, re.DOTALL)
  if m:
    rest = m.group(2) or ""
    if re.search(rf"\([{letters}]\)|(?:^|\s)(?:or|and|,)\s*\(?[{letters}]\b", rest):
      return None
    return m.group(1).upper()
  anchored = re.findall(rf"(?i:answer|option|choice)\s*(?:is|:)?\s*\(?([{letters}])\)?(?![A-Za-z0-9])", s)
  if anchored:
    return anchored[-1] if len(set(anchored)) == 1 else None
  standalone = set(re.findall(rf"(?<![A-Za-z0-9\\])\(?([{letters}])\)?(?![A-Za-z0-9])", s))
  return standalone.pop() if len(standalone) == 1 else None
