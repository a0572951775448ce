"""Preference pairs in LLaMA-Factory's pairwise ShareGPT format, read and written.

    {"conversations": [{"from": "system", "value": "..."}, {"from": "human", "value": "<image>..."}],
     "chosen": {"from": "gpt", "value": "..."}, "rejected": {"from": "gpt", "value": "..."},
     "images": ["images/3f2a....png"]}

LLaMA-Factory (`data/converter.py`, `SharegptDatasetConverter`) takes an optional leading system turn,
then human/gpt turns that alternate and, for ranking data, end with a human turn; it counts `<image>`
placeholders against `images` in every message, and resolves relative image paths inside its
`media_dir` (by default `dataset_dir`, the directory of `dataset_info.json`). The writer keeps to these
rules and puts the images next to the JSONL file; the reader checks them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from specs_jax.data.rows import RowContext, image_list, log, read_rows
from specs_jax.data.types import (IMAGE_TOKEN, PreferencePair, ReadResult, content_to_text, count_image_parts,
                                  load_image, text_to_content)

_ROLE_TO_FROM = {"system": "system", "user": "human", "assistant": "gpt"}
_FROM_TO_ROLE = {v: k for k, v in _ROLE_TO_FROM.items()}


def _pair_row(row: dict, ctx: RowContext) -> PreferencePair:
  conv = ctx.require(row, "conversations", types=(list,))
  messages = []
  for j, turn in enumerate(conv):
    if not isinstance(turn, Mapping) or turn.get("from") not in _FROM_TO_ROLE or not isinstance(turn.get("value"), str):
      raise ctx.error(f"conversations[{j}]", "bad_value", "expected {'from': system|human|gpt, 'value': str}")
    messages.append({"role": _FROM_TO_ROLE[turn["from"]], "content": text_to_content(turn["value"])})
  turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
  # LLaMA-Factory's rule for ranking rows: human/gpt alternate, starting and ending with human.
  if not turns or len(turns) % 2 == 0 or any(m["role"] != ("user" if k % 2 == 0 else "assistant")
                                             for k, m in enumerate(turns)):
    raise ctx.error("conversations", "bad_value", "turns must alternate human/gpt, starting and ending with human")
  responses = []
  for key in ("chosen", "rejected"):
    turn = ctx.require(row, key, types=(Mapping,))
    if turn.get("from") != "gpt" or not isinstance(turn.get("value"), str):
      raise ctx.error(key, "bad_value", "expected {'from': 'gpt', 'value': str}")
    if IMAGE_TOKEN in turn["value"]:
      raise ctx.error(key, "bad_value", f"a response must not contain {IMAGE_TOKEN}")
    responses.append(turn["value"])
  images = image_list(row.get("images"), ctx, "images")
  n_parts = count_image_parts(messages)
  if n_parts != len(images):
    raise ctx.error("images", "image_count_mismatch", f"{n_parts} {IMAGE_TOKEN} placeholders but {len(images)} images")
  meta = row.get("meta")
  if isinstance(meta, str):
    try:
      meta = json.loads(meta)
    except json.JSONDecodeError as e:
      raise ctx.error("meta", "bad_value", f"meta is not valid JSON: {e.msg}") from e
  ident = row.get("id") if row.get("id") is not None else f"{ctx.path.stem}/{ctx.index}"
  meta = meta if isinstance(meta, dict) else {}
  return PreferencePair(str(ident), messages, images, responses[0], responses[1], meta)


def read_preference_pairs(path: str | os.PathLike | Sequence[str | os.PathLike],
                          image_root: str | os.PathLike | None = None, on_error: str = "skip", *,
                          check_images: bool = True) -> ReadResult[PreferencePair]:
  """Reads LLaMA-Factory pairwise ShareGPT rows into `PreferencePair`s.

  Rows: {"conversations": [{"from": "system"|"human"|"gpt", "value": "<image>..."}, ...],
  "chosen": {"from": "gpt", "value": ...}, "rejected": {...}, "images": [paths]}. Image paths are relative
  to `image_root`, by default the data file's directory (LLaMA-Factory's `media_dir` = `dataset_dir`).
  """
  return read_rows(path, _pair_row, image_root, on_error, check_images, what="preference pairs")


def pair_to_sharegpt(pair: PreferencePair, image_paths: Sequence[str], write_meta: bool = False) -> dict:
  """One LLaMA-Factory pairwise row for a pair whose images are stored at `image_paths`."""
  conversations = []
  for m in pair.messages:
    if m["role"] not in _ROLE_TO_FROM:
      raise ValueError(f"pair {pair.id}: unsupported role {m['role']!r}")
    conversations.append({"from": _ROLE_TO_FROM[m["role"]], "value": content_to_text(m["content"])})
  turns = conversations[1:] if conversations and conversations[0]["from"] == "system" else conversations
  if not turns or turns[-1]["from"] != "human":
    raise ValueError(f"pair {pair.id}: the prompt must end with a user message")
  n_parts = count_image_parts(pair.messages)
  if n_parts != len(image_paths):
    raise ValueError(f"pair {pair.id}: {n_parts} image parts in the messages but {len(image_paths)} images")
  for name, text in (("chosen", pair.chosen), ("rejected", pair.rejected)):
    if IMAGE_TOKEN in text:
      raise ValueError(f"pair {pair.id}: the {name} response contains {IMAGE_TOKEN}, which LLaMA-Factory "
                       "would count as an image")
  row = {"id": pair.id, "conversations": conversations, "chosen": {"from": "gpt", "value": pair.chosen},
         "rejected": {"from": "gpt", "value": pair.rejected}, "images": list(image_paths)}
  if write_meta and pair.meta:
    row["meta"] = json.dumps(pair.meta, sort_keys=True, ensure_ascii=False)  # a string keeps the arrow type stable
  return row


def _save_png(image: Any, image_dir: Path) -> Path:
  buf = io.BytesIO()
  load_image(image).save(buf, format="PNG")
  data = buf.getvalue()
  out = image_dir / f"{hashlib.sha256(data).hexdigest()[:24]}.png"  # content-addressed: shared images stored once
  if not out.exists():
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, out)
  return out


def write_preference_pairs(pairs: Iterable[PreferencePair], path: str | os.PathLike,
                           image_dir: str | os.PathLike | None = None, *, dataset_name: str | None = None,
                           write_meta: bool = False) -> Path:
  """Writes pairs as LLaMA-Factory pairwise ShareGPT JSON lines, images as PNG files.

  Args:
    pairs: the pairs, written in order.
    path: the `.jsonl` file to write (atomically: a temporary file, then a rename).
    image_dir: where the PNGs go (default: `images/` next to `path`); it must be inside `path`'s directory,
      since rows give image paths relative to it (LLaMA-Factory's `media_dir`, and the root that
      `read_preference_pairs` confines paths to). Files are named by content hash.
    dataset_name: if set, also add an entry for this file to `dataset_info.json` next to it (created or
      updated), so LLaMA-Factory can load it with `dataset: <dataset_name>`.
    write_meta: also write each pair's meta, as a JSON string under "meta".

  Returns:
    The path written. The same pairs always give byte-identical files.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  image_dir = Path(image_dir) if image_dir is not None else path.parent / "images"
  image_dir.mkdir(parents=True, exist_ok=True)
  base = path.parent.resolve()
  if not image_dir.resolve().is_relative_to(base):
    raise ValueError(f"image_dir {image_dir} must be inside {base}, the directory of {path.name}")
  tmp = path.with_name(path.name + f".tmp{os.getpid()}")
  n = 0
  try:
    with tmp.open("w", encoding="utf-8") as f:
      for pair in pairs:
        paths = [str(_save_png(im, image_dir).resolve().relative_to(base)) for im in pair.images]
        f.write(json.dumps(pair_to_sharegpt(pair, paths, write_meta), ensure_ascii=False) + "\n")
        n += 1
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
  if dataset_name is not None:
    info_path = path.parent / "dataset_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info[dataset_name] = {"file_name": path.name, "formatting": "sharegpt", "ranking": True,
                          "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected",
                                      "images": "images"}}
    info_path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
  log.info("wrote %d preference pairs to %s (images in %s)", n, path, image_dir)
  return path
