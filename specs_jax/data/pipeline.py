"""grain pipelines: prompt pools and preference pairs -> static-shape numpy batches, checkpointable.

    cfg = pipeline.PromptPipelineConfig(batch_size=8, prompt_buckets=(256, 512), patch_buckets=(2048, 4096),
                                        seed=0, num_epochs=None)
    it = pipeline.prompt_batches(records.open_examples(d, "train"), tokenizer, cfg)   # or a list of Examples
    batch = next(it)                                  # dict of numpy arrays + host metadata lists
    state = it.get_state()                            # JSON-able: grain position + skip counters
    it.set_state(state)                               # resumes at exactly the next batch
    print(it.counters.summary())                      # "2 batches from 17 rows (16 used); skipped 1 (bad_image: 1)"

The stages, in order:

    source ─ per-host shard ─ shuffle(seed, reshuffled each epoch) ─ repeat(num_epochs) ─ encode     MapDataset
      ─ to_iter_dataset ─ [mp_prefetch(worker_count)] ─ reject/count + batch + pad (main process)      IterDataset

`encode` (threads or worker processes) decodes the images, preprocesses them, tokenizes the chat
prompt (and responses) and checks the length budgets; it never drops anything, it returns either an
encoded item or a rejection (reason, field, detail). The last stage, in the main process, counts and
logs each rejection (`on_error="skip"`) or raises it (`"fail"`), and batches the survivors. Because
rejection happens after `mp_prefetch` and grain reads workers round-robin, batch composition is a
pure function of (data, seed, shard) and does not depend on `worker_count` (grain's own warning about
filters before `mp_prefetch` does not apply). The skip counters live in that last stage, so they are
part of the iterator state and survive a checkpoint.

Length budgets, checked per example so every batch fits its buckets (STYLE.md §5):
  prompt tokens <= max(prompt_buckets); each response (pairs, SFT) <= max(completion_buckets);
  images <= max_images; vision patches <= max(patch_buckets) // batch_size (the patch buckets size a
  whole batch, so B examples at this budget always fit).
Violations are rejections with reasons `prompt_too_long`, `completion_too_long`, `too_many_images`,
`too_many_patches`; in "fail" mode they raise `OverlongError` naming the example. Images that cannot
be read or decoded (`bad_image`), image-count mismatches and malformed records (`DataError` from the
source) raise `DataError` naming the source, row and field.

Per-host sharding: host k of n reads source rows k, k+n, ... of each epoch's global shuffle (every host
shuffles identically, so the shards partition the data); the last len % n rows of each epoch's
shuffled order are dropped so every host has the same number of rows. Hosts can still skip different numbers of bad
rows, so with a finite `num_epochs` they may run out at different steps: train on `num_epochs=None`
and stop after a fixed number of steps.

Batch layouts (B = batch_size; P, C, Nb = bucketed prompt, completion, patch lengths; I = B * max_images):
  prompt_batches   input_ids [B, P] int32 left-padded, attention_mask [B, P] int32, prompt_lengths [B],
                   pixel_values [Nb, 1176] float32, patch_valid [Nb] bool, image_grid_thw [I, 3] int32
                   (images in row order, zero rows after), num_images [B] int32, example_mask [B] bool;
                   host lists: example_id, gold, answer_type, format, source.
  pair_batches     rows [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]: input_ids, attention_mask,
                   completion_mask [2B, P+C] int32 (prompt left-padded to P, response right-padded from
                   column P), prompt_lengths, completion_lengths [2B] int32; images once per pair
                   (pixel_values, patch_valid, image_grid_thw [I, 3], num_images [B]: pair b's images serve
                   rows b and B+b); example_mask [B]; ref_logps [2B] float32 (chosen then rejected) when every
                   pair of the batch carries reference log-probs; host list: example_id.
  sft_batches      input_ids, attention_mask, completion_mask [B, P+C], prompt_lengths, completion_lengths,
                   images as prompt_batches, example_mask [B]; host list: example_id.
A `collate=` callable replaces these layouts (it gets the checked, encoded items; see `Encoded`).
With `drop_remainder=False` the last batch is filled up to B with copies of its first row, marked False
in `example_mask` (and with completion_mask zeroed): shapes stay static, and losses must weigh by it.
Keys listed in `HOST_KEYS` are Python lists, the rest numpy arrays (`device_arrays(batch)` keeps those).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from specs_jax.data.records import REF_CHOSEN_KEY, REF_REJECTED_KEY
from specs_jax.data.types import DataError, Example, ImageRef, LazyImage, PreferencePair
from specs_jax.processing import batching, chat
from specs_jax.processing import image as image_lib

log = logging.getLogger("specs_jax.data.pipeline")

OVERLONG_REASONS = ("prompt_too_long", "completion_too_long", "too_many_images", "too_many_patches")
DATA_REASONS = ("bad_image", "image_count_mismatch", "missing_field", "bad_json", "bad_value",
                "image_outside_root", "bad_answer_type")
SKIP_REASONS = OVERLONG_REASONS + DATA_REASONS
HOST_KEYS = frozenset({"example_id", "gold", "answer_type", "format", "source"})
LOGGED_SKIPS_PER_REASON = 10


# ----------------------------------------------------------------------------------------------------------
# Config and counters


def _buckets(value: batching.Buckets | Sequence[int] | int) -> batching.Buckets:
  if isinstance(value, batching.Buckets):
    return value
  return batching.Buckets((int(value),)) if isinstance(value, int) else batching.Buckets(tuple(value))


@dataclasses.dataclass(frozen=True)
class PromptPipelineConfig:
  """Settings of `prompt_batches`, `pair_batches` and `sft_batches`.

  Attributes:
    batch_size: B, examples (pairs) per batch on this host.
    prompt_buckets: allowed padded prompt lengths P; the largest is the prompt budget.
    completion_buckets: allowed padded response lengths C (pairs, SFT); the largest is the budget.
    patch_buckets: allowed padded vision-patch counts Nb of a whole batch; each example may use at most
      max(patch_buckets) // batch_size patches.
    max_images: images per example (pair); image_grid_thw has batch_size * max_images rows.
    seed: shuffle seed; the same seed gives byte-identical batches.
    shuffle: shuffle globally (reshuffled every epoch); False keeps source order.
    num_epochs: passes over the data; None repeats forever.
    drop_remainder: drop a last partial batch (True) or fill it with masked rows (False).
    on_error: "skip" (count, log, continue) or "fail" (raise) for bad or overlong examples.
    worker_count: grain worker processes for decoding + tokenizing (0: threads in this process).
    worker_buffer_size: elements each worker prepares ahead.
    num_threads: reader threads (per worker when worker_count > 0).
    prefetch_buffer_size: elements the reader threads prepare ahead.
    image: image preprocessing settings (pixel limits etc.).
    system_prompt: system message for examples whose messages have none (None: the chat template's
      default); examples with their own system message keep it.
  """

  batch_size: int
  prompt_buckets: batching.Buckets | Sequence[int] = (256, 512, 1024, 2048)
  completion_buckets: batching.Buckets | Sequence[int] = (256, 512, 1024, 2048)
  patch_buckets: batching.Buckets | Sequence[int] = (1024, 4096, 16384)
  max_images: int = 4
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = 1
  drop_remainder: bool = True
  on_error: str = "skip"
  worker_count: int = 0
  worker_buffer_size: int = 8
  num_threads: int = 2
  prefetch_buffer_size: int = 16
  image: image_lib.ImageConfig = dataclasses.field(default_factory=image_lib.ImageConfig)
  system_prompt: str | None = None

  def __post_init__(self):
    for name in ("prompt_buckets", "completion_buckets", "patch_buckets"):
      object.__setattr__(self, name, _buckets(getattr(self, name)))
    if self.batch_size <= 0:
      raise ValueError(f"batch_size must be positive, got {self.batch_size}")
    if self.max_images < 0:
      raise ValueError(f"max_images must be >= 0, got {self.max_images}")
    if self.num_epochs is not None and self.num_epochs <= 0:
      raise ValueError(f"num_epochs must be positive or None (forever), got {self.num_epochs}")
    if self.on_error not in ("skip", "fail"):
      raise ValueError(f"on_error must be 'skip' or 'fail', got {self.on_error!r}")
    if self.worker_count < 0 or self.num_threads < 0:
      raise ValueError(f"worker_count and num_threads must be >= 0, got {self.worker_count}, {self.num_threads}")
    if self.patches_per_example < 1:
      raise ValueError(f"max(patch_buckets)={self.patch_buckets.max} leaves no patches per example at "
                       f"batch_size={self.batch_size}; raise the largest patch bucket")

  @property
  def patches_per_example(self) -> int:
    """Vision-patch budget of one example: max(patch_buckets) // batch_size."""
    return self.patch_buckets.max // self.batch_size

  @property
  def max_images_per_batch(self) -> int:
    return self.batch_size * self.max_images


@dataclasses.dataclass
class Counters:
  """What the pipeline has consumed and skipped so far; saved in the iterator state.

  Attributes:
    seen: source rows read (used + skipped + a dropped last partial batch).
    used: examples placed in batches (fill rows of a last partial batch not counted).
    batches: batches yielded.
    skipped: reason -> count, every reason of `SKIP_REASONS` present (zeros included), so the state
      has the same structure throughout the run.
  """

  seen: int = 0
  used: int = 0
  batches: int = 0
  skipped: dict[str, int] = dataclasses.field(default_factory=lambda: {r: 0 for r in SKIP_REASONS})

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())

  def to_state(self) -> dict[str, Any]:
    return {"seen": self.seen, "used": self.used, "batches": self.batches, "skipped": dict(self.skipped)}

  @classmethod
  def from_state(cls, state: dict[str, Any]) -> Counters:
    skipped = {r: 0 for r in SKIP_REASONS}
    skipped.update({str(k): int(v) for k, v in state["skipped"].items()})
    return cls(seen=int(state["seen"]), used=int(state["used"]), batches=int(state["batches"]), skipped=skipped)

  def summary(self) -> str:
    """One line: "3 batches from 30 rows (28 used); skipped 2 (bad_image: 1, prompt_too_long: 1)"."""
    s = f"{self.batches} batches from {self.seen} rows ({self.used} used)"
    nonzero = {k: v for k, v in sorted(self.skipped.items()) if v}
    if nonzero:
      return s + f"; skipped {self.num_skipped} (" + ", ".join(f"{k}: {v}" for k, v in nonzero.items()) + ")"
    return s + "; skipped 0"


# ----------------------------------------------------------------------------------------------------------
# Encoding (runs in reader threads or worker processes: module-level and picklable)


@dataclasses.dataclass(frozen=True)
class _Rejected:
  """An example the pipeline will not use, with everything needed to count it or raise about it."""

  index: int
  example_id: str | None
  reason: str
  field: str | None
  detail: str
  length: int = 0
  budget: int = 0

  def error(self, source_name: str) -> Exception:
    who = f"example {self.example_id!r}" if self.example_id is not None else "a row"
    if self.reason in OVERLONG_REASONS:
      return batching.OverlongError(
          f"{source_name} row {self.index}: {who} {self.field}", self.length, self.budget,
          hint=f"{self.reason}: {self.detail}; or use on_error='skip'")
    return DataError(source_name, self.index, self.field, self.reason, f"{who}: {self.detail}")

  def message(self, source_name: str) -> str:
    return str(self.error(source_name))


@dataclasses.dataclass(frozen=True, eq=False)
class Encoded:
  """One example (pair) that passed every check, as a custom `collate=` receives it.

  Attributes:
    index: its row in the source.
    example_id: `Example.id` / `PreferencePair.id`.
    prompt: the `chat.EncodedPrompt` (input_ids [p], pixel_values [n, 1176], image_grid_thw [k, 3], ...).
    completions: token ids [c] int32 ending with <|im_end|>: () for prompts, (chosen, rejected) for
      pairs, (response,) for SFT.
    info: host metadata: prompts {"gold", "answer_type", "format", "source"}; pairs {"ref": (chosen,
      rejected) reference log-probs or None}; SFT {}.
  """

  index: int
  example_id: str
  prompt: chat.EncodedPrompt
  completions: tuple[np.ndarray, ...]
  info: dict

  # Duck-compatible with `batching.collate_prompts`.
  @property
  def input_ids(self) -> np.ndarray:
    return self.prompt.input_ids

  @property
  def pixel_values(self) -> np.ndarray:
    return self.prompt.pixel_values

  @property
  def image_grid_thw(self) -> np.ndarray:
    return self.prompt.image_grid_thw


Collate = Callable[[list[Encoded]], dict[str, Any]]  # a batch's items -> the batch


class _IndexedSource:
  """source[i] -> (i, element), or (i, DataError) for a row the source cannot read."""

  def __init__(self, source: Sequence[Any]):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> tuple[int, Any]:
    try:
      return i, self.source[i]
    except DataError as e:
      return i, e


# What decoding outside data can raise: PIL's OSError / SyntaxError / EOFError / DecompressionBombError,
# ImageError (a ValueError) from `image.load_image`, TypeError for an unsupported object.
_IMAGE_LOAD_ERRORS = (OSError, ValueError, TypeError, SyntaxError, EOFError, Image.DecompressionBombError)


def _decode_image(im: Any) -> Image.Image:
  """Any image of an Example -> RGB PIL, converted as transformers does (alpha composited onto white):
  encoded bytes and paths go to `image.load_image` untouched rather than through `ImageRef.load`, whose
  plain `convert("RGB")` would drop alpha differently from HF."""
  if isinstance(im, ImageRef):
    return image_lib.load_image(im.data if im.data is not None else im.path)
  if isinstance(im, LazyImage) and not isinstance(im, Image.Image):
    im = im.load()
  return image_lib.load_image(im)


class _Encode(grain.transforms.Map):
  """(index, Example | PreferencePair) -> `Encoded` or `_Rejected`. kind: "prompt", "pair" or "sft"."""

  def __init__(self, kind: str, tokenizer: Any, config: PromptPipelineConfig):
    self.kind, self.tokenizer, self.config = kind, tokenizer, config

  def map(self, item: tuple[int, Any]) -> Encoded | _Rejected:
    index, element = item
    if isinstance(element, DataError):
      return _Rejected(index, None, element.reason, element.field, element.detail)
    self._check_type(index, element)
    cfg = self.config
    reject = lambda reason, field, detail, length=0, budget=0: _Rejected(  # noqa: E731
        index, element.id, reason, field, detail, length, budget)
    if len(element.images) > cfg.max_images:
      return reject("too_many_images", "images", "more images than max_images",
                    len(element.images), cfg.max_images)
    responses = self._responses(element)
    if isinstance(responses, str):
      return reject("missing_field", responses, "SFT needs a response (PreferencePair.chosen or meta['response'])")
    images = []
    for k, im in enumerate(element.images):
      try:
        images.append(_decode_image(im))
      except _IMAGE_LOAD_ERRORS as e:
        detail = str(e) if isinstance(e, image_lib.ImageError) else f"cannot read image {im!r}: {type(e).__name__}: {e}"
        return reject("bad_image", f"images[{k}]", detail)
    messages = element.messages
    has_system = bool(messages) and messages[0].get("role") == "system"
    try:
      enc = chat.encode_prompt(self.tokenizer, messages, images, cfg.image,
                               system_prompt=None if has_system else cfg.system_prompt)
    except chat.ImageCountError as e:
      return reject("image_count_mismatch", "messages", str(e))
    except image_lib.ImageError as e:
      return reject("bad_image", "images", str(e))
    if len(enc.input_ids) > cfg.prompt_buckets.max:
      return reject("prompt_too_long", "prompt", "prompt tokens over max(prompt_buckets)",
                    len(enc.input_ids), cfg.prompt_buckets.max)
    if enc.pixel_values.shape[0] > cfg.patches_per_example:
      return reject("too_many_patches", "vision patches", "vision patches over max(patch_buckets) // batch_size",
                    enc.pixel_values.shape[0], cfg.patches_per_example)
    completions = tuple(chat.encode_response(self.tokenizer, r) for r in responses)
    for name, ids in zip(self._response_fields(), completions):
      if len(ids) > cfg.completion_buckets.max:
        return reject("completion_too_long", name, "response tokens (with <|im_end|>) over max(completion_buckets)",
                      len(ids), cfg.completion_buckets.max)
    return Encoded(index, element.id, enc, completions, self._info(element))

  def _check_type(self, index: int, element: Any) -> None:
    wanted = {"prompt": (Example,), "pair": (PreferencePair,), "sft": (PreferencePair, Example)}[self.kind]
    if not isinstance(element, wanted):
      raise TypeError(f"{self.kind} pipeline: row {index} is a {type(element).__name__}, expected "
                      f"{' or '.join(t.__name__ for t in wanted)}")

  def _responses(self, element: Any) -> tuple[str, ...] | str:
    """The response texts, or the name of the missing field."""
    if self.kind == "prompt":
      return ()
    if self.kind == "pair":
      return (element.chosen, element.rejected)
    if isinstance(element, PreferencePair):
      return (element.chosen,)
    response = element.meta.get("response")
    return (response,) if isinstance(response, str) else "meta.response"

  def _response_fields(self) -> tuple[str, ...]:
    return {"prompt": (), "pair": ("chosen", "rejected"), "sft": ("response",)}[self.kind]

  def _info(self, element: Any) -> dict:
    if self.kind == "prompt":
      return {"gold": element.gold, "answer_type": element.answer_type, "format": element.meta.get("format"),
              "source": element.source}
    if self.kind == "pair":
      c, r = element.meta.get(REF_CHOSEN_KEY), element.meta.get(REF_REJECTED_KEY)
      return {"ref": (float(c), float(r)) if c is not None and r is not None else None}
    return {}


# ----------------------------------------------------------------------------------------------------------
# Collation (main process)


def _fill(items: list[Encoded], batch_size: int) -> tuple[list[Encoded], np.ndarray]:
  """Pads a short last batch with copies of its first row; returns the rows and example_mask [B]."""
  mask = np.zeros((batch_size,), bool)
  mask[:len(items)] = True
  return items + [items[0]] * (batch_size - len(items)), mask


def _images(rows: list[Encoded], cfg: PromptPipelineConfig) -> dict[str, np.ndarray]:
  pv = np.concatenate([r.pixel_values for r in rows], axis=0)
  grid = np.concatenate([r.image_grid_thw.reshape(-1, 3) for r in rows], axis=0).astype(np.int32)
  nb = cfg.patch_buckets(pv.shape[0], what="batch vision patches")
  pv, valid, grid = batching.pad_patches(pv, grid, nb, max_images=cfg.max_images_per_batch)
  return {"pixel_values": pv, "patch_valid": valid, "image_grid_thw": grid,
          "num_images": np.asarray([len(r.image_grid_thw) for r in rows], np.int32)}


def _ids(rows: list[Encoded], mask: np.ndarray) -> list[str]:
  return [r.example_id if m else "" for r, m in zip(rows, mask)]


class _Collate:
  """List of `Encoded` (<= B) -> one batch dict; kind as `_Encode`."""

  def __init__(self, kind: str, config: PromptPipelineConfig, pad_id: int):
    self.kind, self.config, self.pad_id = kind, config, pad_id

  def __call__(self, items: list[Encoded]) -> dict[str, Any]:
    rows, mask = _fill(items, self.config.batch_size)
    return {"prompt": self._prompts, "pair": self._pairs, "sft": self._sft}[self.kind](rows, mask)

  def _prompts(self, rows: list[Encoded], mask: np.ndarray) -> dict[str, Any]:
    cfg = self.config
    out = batching.collate_prompts(rows, self.pad_id, cfg.prompt_buckets, cfg.patch_buckets,
                                   max_images=cfg.max_images_per_batch)
    out["num_images"] = np.asarray([len(r.image_grid_thw) for r in rows], np.int32)
    out["example_mask"] = mask
    out["example_id"] = _ids(rows, mask)
    for key in ("gold", "answer_type", "format", "source"):
      out[key] = [r.info[key] if m else None for r, m in zip(rows, mask)]
    return out

  def _packed(self, prompts: list[np.ndarray], completions: list[np.ndarray]) -> dict[str, np.ndarray]:
    cfg = self.config
    p = cfg.prompt_buckets(max(len(x) for x in prompts), what="longest prompt")
    c = cfg.completion_buckets(max(len(x) for x in completions), what="longest completion")
    return batching.pack_prompt_completion(prompts, completions, self.pad_id, p, c)

  def _pairs(self, rows: list[Encoded], mask: np.ndarray) -> dict[str, Any]:
    prompts = [r.input_ids for r in rows]
    out = self._packed(prompts + prompts, [r.completions[0] for r in rows] + [r.completions[1] for r in rows])
    row_mask = np.concatenate([mask, mask])
    out["completion_mask"] = out["completion_mask"] * row_mask[:, None].astype(np.int32)
    out.update(_images(rows, self.config))
    out["example_mask"] = mask
    out["example_id"] = _ids(rows, mask)
    refs = [r.info["ref"] for r in rows]
    if all(ref is not None for ref in refs):
      out["ref_logps"] = np.asarray([c for c, _ in refs] + [r for _, r in refs], np.float32)
    elif any(ref is not None for ref in refs):
      missing = next(r.example_id for r in rows if r.info["ref"] is None)
      raise ValueError(f"pair {missing!r} has no reference log-probs but others in its batch do; "
                       f"store them for every pair ({REF_CHOSEN_KEY!r}, {REF_REJECTED_KEY!r} in meta) or none")
    return out

  def _sft(self, rows: list[Encoded], mask: np.ndarray) -> dict[str, Any]:
    out = self._packed([r.input_ids for r in rows], [r.completions[0] for r in rows])
    out["completion_mask"] = out["completion_mask"] * mask[:, None].astype(np.int32)
    out.update(_images(rows, self.config))
    out["example_mask"] = mask
    out["example_id"] = _ids(rows, mask)
    return out


# ----------------------------------------------------------------------------------------------------------
# The last stage: reject / count, batch, pad; carries the counters in its state


class PipelineIterator(grain.DatasetIterator):
  """The iterator the pipelines return: a grain `DatasetIterator` yielding batch dicts.

  `get_state()` -> {"parent": grain's reader state, "counters": `Counters.to_state()`, "layout": rows, seed,
  shuffle, shard, worker_count}, JSON-able; `set_state(state)` resumes at exactly the next batch, and
  refuses a state saved with another layout (ValueError naming the differences). `counters` has the
  running counts; a summary is logged when the data runs out. `close()` stops worker processes.
  """

  def __init__(self, parent: grain.DatasetIterator, collate: Collate,
               config: PromptPipelineConfig, source_name: str, epoch_size: int, layout: dict[str, Any]):
    super().__init__(parent)
    self._collate, self._config, self._source_name = collate, config, source_name
    self._epoch_size = epoch_size
    self._layout = layout
    self._consecutive_skips = 0
    self._reported = False
    self.counters = Counters()

  def _skip(self, rej: _Rejected) -> None:
    if self._config.on_error == "fail":
      raise rej.error(self._source_name)
    self.counters.skipped[rej.reason] = self.counters.skipped.get(rej.reason, 0) + 1
    n = self.counters.skipped[rej.reason]
    if n <= LOGGED_SKIPS_PER_REASON:
      log.warning("skipping (%s%s): %s", rej.reason, ", further ones not logged" if n == LOGGED_SKIPS_PER_REASON
                  else "", rej.message(self._source_name))
    self._consecutive_skips += 1
    # 2N - 1 consecutive positions always contain one whole epoch (N rows): every row is bad, and with
    # num_epochs=None the loop would spin forever. (N in a row can be the tail of one epoch's order and
    # the head of the next, covering the same few bad rows twice.)
    if self._consecutive_skips >= 2 * self._epoch_size - 1:
      raise RuntimeError(f"{self._source_name}: {self._consecutive_skips} rows in a row were skipped, a whole "
                         f"epoch of this shard; {self.counters.summary()}")

  def __next__(self) -> dict[str, Any]:
    self._assert_not_closed()
    items: list[Encoded] = []
    while len(items) < self._config.batch_size:
      try:
        item = next(self._parent)
      except StopIteration:
        break
      self.counters.seen += 1
      if isinstance(item, _Rejected):
        self._skip(item)
        continue
      self._consecutive_skips = 0
      items.append(item)
    if not items or (len(items) < self._config.batch_size and self._config.drop_remainder):
      if not self._reported:
        self._reported = True
        log.info("%s: end of data: %s", self._source_name, self.counters.summary())
      raise StopIteration
    batch = self._collate(items)
    self.counters.batches += 1
    self.counters.used += len(items)
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), "counters": self.counters.to_state(),
            "layout": dict(self._layout)}

  def set_state(self, state: dict[str, Any]) -> None:
    # A position only means something for the same rows in the same order, and grain's state format
    # differs with and without worker processes: refuse a state from another layout.
    saved = state.get("layout", {})
    diff = {k: (saved.get(k), v) for k, v in self._layout.items() if saved.get(k) != v}
    if diff:
      raise ValueError(f"{self._source_name}: iterator state was saved with another data layout: "
                       + ", ".join(f"{k} saved {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items())))
    self._parent.set_state(state["parent"])
    self.counters = Counters.from_state(state["counters"])
    self._consecutive_skips = 0
    self._reported = False

  def __str__(self) -> str:
    return f"PipelineIterator({self._source_name})"


class _RejectBatchDataset(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset, make_iterator: Callable[[grain.DatasetIterator], PipelineIterator]):
    super().__init__(parent)
    self._make_iterator = make_iterator

  def __iter__(self) -> PipelineIterator:
    return self._make_iterator(self._parent.__iter__())

  def __str__(self) -> str:
    return "RejectBatchDataset"


# ----------------------------------------------------------------------------------------------------------
# Public builders


def _shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
  if shard_index is None or shard_count is None:
    import jax  # lazily: this module is also used by worker processes and host-only tools

    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if shard_count <= 0 or not 0 <= shard_index < shard_count:
    raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
  return int(shard_index), int(shard_count)


def _source_name(source: Any) -> str:
  name = getattr(source, "name", None)
  return name if isinstance(name, str) else f"<{type(source).__name__} source>"


def _pad_id(tokenizer: Any) -> int:
  pad = getattr(tokenizer, "pad_token_id", None)
  if pad is None:
    raise ValueError("the tokenizer has no pad token (Qwen uses <|endoftext|>)")
  return int(pad)


def _build(kind: str, source: Sequence[Any], tokenizer: Any, config: PromptPipelineConfig,
           shard_index: int | None, shard_count: int | None, collate: Collate | None) -> PipelineIterator:
  shard_index, shard_count = _shard(shard_index, shard_count)
  n = len(source)
  per_shard = n // shard_count
  name = _source_name(source)
  if per_shard == 0:
    raise ValueError(f"{name}: {n} rows cannot be split into {shard_count} non-empty shards")
  ds = grain.MapDataset.source(_IndexedSource(source))
  if config.shuffle:
    ds = ds.seed(config.seed).shuffle()
  # Every host shuffles identically, then takes rows shard_index, +shard_count, ...; rows past
  # per_shard * shard_count are dropped so all hosts have as many rows per epoch.
  ds = ds[shard_index:per_shard * shard_count:shard_count]
  ds = ds.repeat(config.num_epochs)  # None: forever; each epoch is shuffled anew (grain folds in the epoch)
  ds = ds.map(_Encode(kind, tokenizer, config))
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.num_threads,
                                               prefetch_buffer_size=config.prefetch_buffer_size))
  if config.worker_count > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count,
                                                           per_worker_buffer_size=config.worker_buffer_size))
  if collate is None:
    collate = _Collate(kind, config, _pad_id(tokenizer))
  layout = {"rows": n, "seed": config.seed, "shuffle": config.shuffle, "shard_index": shard_index,
            "shard_count": shard_count, "worker_count": config.worker_count, "kind": kind}
  out = _RejectBatchDataset(it_ds, lambda parent: PipelineIterator(parent, collate, config, name, per_shard, layout))
  log.info("%s pipeline over %s: %d rows, shard %d/%d has %d per epoch (%d dropped to even shards), epochs %s, "
           "batch %d, prompt buckets %s, patch buckets %s (%d patches per example), workers %d", kind, name, n,
           shard_index, shard_count, per_shard, n - per_shard * shard_count, config.num_epochs or "forever",
           config.batch_size, config.prompt_buckets.sizes, config.patch_buckets.sizes, config.patches_per_example,
           config.worker_count)
  return iter(out)


def prompt_batches(source: Sequence[Example], tokenizer: Any, config: PromptPipelineConfig, *,
                   shard_index: int | None = None, shard_count: int | None = None,
                   collate: Collate | None = None) -> PipelineIterator:
  """Batches of prompts (RL rollouts, evaluation): images decoded and patched, prompts tokenized and padded.

  Args:
    source: random-access `Example`s (a list, `records.open_examples(...)`, any grain data source).
    tokenizer: HF tokenizer with the Qwen special tokens and chat template (pickled to workers).
    config: the pipeline settings.
    shard_index, shard_count: this host's shard; default `jax.process_index()`, `jax.process_count()`.
    collate: replaces the default batch layout: called in the main process with the batch's `Encoded`
      items (batch_size of them; fewer only for a last batch with drop_remainder=False, which it must
      pad itself) and returns the batch. E.g. a model-specific layout (slot-packed images, M-RoPE
      positions) built from `item.prompt` and `item.completions`.
  Returns:
    a `PipelineIterator` of batch dicts (layout in the module docstring).
  """
  return _build("prompt", source, tokenizer, config, shard_index, shard_count, collate)


def pair_batches(source: Sequence[PreferencePair], tokenizer: Any, config: PromptPipelineConfig, *,
                 shard_index: int | None = None, shard_count: int | None = None,
                 collate: Collate | None = None) -> PipelineIterator:
  """Batches of preference pairs in the DPO layout: rows [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}],
  prompts left-padded to P, responses (+ <|im_end|>) right-padded to C, images once per pair. See
  `prompt_batches` for the arguments and the module docstring for the keys."""
  return _build("pair", source, tokenizer, config, shard_index, shard_count, collate)


def sft_batches(source: Sequence[PreferencePair | Example], tokenizer: Any, config: PromptPipelineConfig, *,
                shard_index: int | None = None, shard_count: int | None = None,
                collate: Collate | None = None) -> PipelineIterator:
  """Batches of prompt + response for SFT: a `PreferencePair`'s chosen response, or an `Example`'s
  `meta["response"]` (rows without one are rejected as `missing_field`). completion_mask marks the response
  tokens (+ <|im_end|>). See `prompt_batches` for the arguments."""
  return _build("sft", source, tokenizer, config, shard_index, shard_count, collate)


def device_arrays(batch: dict[str, Any]) -> dict[str, np.ndarray]:
  """The numpy arrays of a batch (what goes to the device), without the host metadata lists."""
  return {k: v for k, v in batch.items() if k not in HOST_KEYS}


__all__ = [
    "Collate", "Counters", "Encoded", "HOST_KEYS", "OVERLONG_REASONS", "PipelineIterator", "PromptPipelineConfig",
    "SKIP_REASONS", "device_arrays", "pair_batches", "prompt_batches", "sft_batches",
]

