"""Qwen2.5-VL configuration: one frozen dataclass, read from and written to HF `config.json`.

Three on-disk layouts exist and all are accepted by `Qwen2_5_VLConfig.from_hf_dict`:
  * the hub layout (transformers 4.41): text fields at the top level, `rope_scaling: {"type": "mrope", ...}`;
  * the transformers 4.53 re-save: the same plus a nested `text_config`;
  * the transformers 5 layout: `text_config` with `rope_parameters`, `vision_config`.
`to_hf_dict` writes the transformers-5 layout (which transformers 5 loads back exactly).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

ATTENTION_IMPLS = ("xla", "dot_product", "cudnn", "splash")


class ConfigError(ValueError):
  """A config.json that cannot describe a Qwen2.5-VL model we can run."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  depth: int = 32
  hidden_size: int = 1280
  num_heads: int = 16
  intermediate_size: int = 3420
  out_hidden_size: int = 3584
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  in_channels: int = 3
  window_size: int = 112
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  tokens_per_second: int = 2
  hidden_act: str = "silu"
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int = 152064
  hidden_size: int = 3584
  num_hidden_layers: int = 28
  num_attention_heads: int = 28
  num_key_value_heads: int = 4
  intermediate_size: int = 18944
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1e6
  mrope_section: tuple[int, ...] = (16, 24, 24)
  max_position_embeddings: int = 128000
  hidden_act: str = "silu"

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig:
  """Architecture + token ids (from config.json) and run-time switches (not in config.json).

  Run-time switches:
    attention_impl: "xla" (einsum + softmax, default), "dot_product" (`jax.nn.dot_product_attention`,
      XLA backend), "cudnn" (`jax.nn.dot_product_attention(implementation="cudnn")`, GPU only),
      "splash" (TPU splash kernel; registered by `attention.register`).
    remat: rematerialise each decoder/vision block in the backward pass ("none", "full", "dots").
    scan_layers: `nn.scan` over decoder layers (stacked params with a leading layer axis).
  """

  text: TextConfig = dataclasses.field(default_factory=TextConfig)
  vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
  tie_word_embeddings: bool = False
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  bos_token_id: int | None = 151643
  eos_token_id: int | None = 151645
  pad_token_id: int | None = None
  attention_impl: str = "xla"
  remat: str = "none"
  scan_layers: bool = False

  def __post_init__(self):
    t, v = self.text, self.vision
    if t.hidden_size % t.num_attention_heads:
      raise ConfigError(f"text hidden_size {t.hidden_size} not divisible by num_attention_heads {t.num_attention_heads}")
    if t.num_attention_heads % t.num_key_value_heads:
      raise ConfigError(
          f"num_attention_heads {t.num_attention_heads} not divisible by num_key_value_heads {t.num_key_value_heads}")
    if sum(t.mrope_section) * 2 != t.head_dim:
      raise ConfigError(f"mrope_section {list(t.mrope_section)} must sum to head_dim/2 = {t.head_dim // 2}")
    if v.hidden_size % v.num_heads:
      raise ConfigError(f"vision hidden_size {v.hidden_size} not divisible by num_heads {v.num_heads}")
    if any(not 0 <= i < v.depth for i in v.fullatt_block_indexes):
      raise ConfigError(f"fullatt_block_indexes {list(v.fullatt_block_indexes)} outside [0, depth={v.depth})")
    if v.window_size % (v.spatial_merge_size * v.patch_size):
      raise ConfigError(f"window_size {v.window_size} must be a multiple of merge*patch = "
                        f"{v.spatial_merge_size * v.patch_size}")
    for act in (t.hidden_act, v.hidden_act):
      if act != "silu":
        raise ConfigError(f"hidden_act {act!r} is not supported (Qwen2.5-VL uses 'silu')")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ConfigError(f"attention_impl {self.attention_impl!r} not in {ATTENTION_IMPLS}")
    if self.remat not in ("none", "full", "dots"):
      raise ConfigError(f"remat {self.remat!r} not in ('none', 'full', 'dots')")

  def replace(self, **kw) -> "Qwen2_5_VLConfig":
    """Copy with top-level fields replaced; `text=dict(...)`/`vision=dict(...)` update sub-configs."""
    for key in ("text", "vision"):
      if isinstance(kw.get(key), dict):
        kw[key] = dataclasses.replace(getattr(self, key), **kw[key])
    return dataclasses.replace(self, **kw)

  # ---------------------------------------------------------------- HF config.json

  @classmethod
  def from_hf_dict(cls, d: dict[str, Any], **runtime) -> "Qwen2_5_VLConfig":
    """Parses any of the three HF layouts (see module docstring)."""
    if d.get("model_type") not in (None, "qwen2_5_vl"):
      raise ConfigError(f"model_type {d.get('model_type')!r} is not 'qwen2_5_vl'")
    td = dict(d)
    if isinstance(d.get("text_config"), dict):
      # transformers >= 4.53: nested text config wins over any top-level copy.
      td = {**d, **{k: v for k, v in d["text_config"].items() if v is not None}}
    rope = td.get("rope_parameters") or td.get("rope_scaling") or {}
    rtype = rope.get("rope_type", rope.get("type", "default"))
    if rtype not in ("default", "mrope"):
      raise ConfigError(f"rope type {rtype!r} is not supported (expected M-RoPE: 'mrope' or 'default')")
    if "mrope_section" not in rope:
      raise ConfigError("rope_scaling/rope_parameters has no 'mrope_section'; this is not a Qwen2.5-VL config")
    theta = rope.get("rope_theta", td.get("rope_theta", 1e6))
    if td.get("use_sliding_window"):
      raise ConfigError("use_sliding_window=true is not supported (no released Qwen2.5-VL uses it)")
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [k for k in required if k not in td]
    if missing:
      raise ConfigError(f"config.json is missing text fields {missing}")
    text = TextConfig(
        vocab_size=int(td["vocab_size"]),
        hidden_size=int(td["hidden_size"]),
        num_hidden_layers=int(td["num_hidden_layers"]),
        num_attention_heads=int(td["num_attention_heads"]),
        num_key_value_heads=int(td.get("num_key_value_heads") or td["num_attention_heads"]),
        intermediate_size=int(td["intermediate_size"]),
        rms_norm_eps=float(td.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        mrope_section=tuple(int(x) for x in rope["mrope_section"]),
        max_position_embeddings=int(td.get("max_position_embeddings", 128000)),
        hidden_act=td.get("hidden_act", "silu"),
    )
    vd = d.get("vision_config")
    if not isinstance(vd, dict):
      raise ConfigError("config.json has no 'vision_config'")
    vrope = vd.get("rope_parameters") or {}
    vision = VisionConfig(
        depth=int(vd.get("depth", vd.get("num_hidden_layers", 32))),
        hidden_size=int(vd.get("hidden_size", 1280)),
        num_heads=int(vd.get("num_heads", vd.get("num_attention_heads", 16))),
        intermediate_size=int(vd.get("intermediate_size", 3420)),
        out_hidden_size=int(vd.get("out_hidden_size", text.hidden_size)),
        patch_size=int(vd.get("patch_size", vd.get("spatial_patch_size", 14))),
        temporal_patch_size=int(vd.get("temporal_patch_size", 2)),
        spatial_merge_size=int(vd.get("spatial_merge_size", 2)),
        in_channels=int(vd.get("in_channels", vd.get("in_chans", 3))),
        window_size=int(vd.get("window_size", 112)),
        fullatt_block_indexes=tuple(int(i) for i in vd.get("fullatt_block_indexes", (7, 15, 23, 31))),
        tokens_per_second=int(vd.get("tokens_per_second", 2)),
        hidden_act=vd.get("hidden_act", "silu"),
        rope_theta=float(vrope.get("rope_theta", 10000.0)),
    )
    if vision.out_hidden_size != text.hidden_size:
      raise ConfigError(f"vision out_hidden_size {vision.out_hidden_size} != text hidden_size {text.hidden_size}")
    tie = bool(d.get("tie_word_embeddings", False) or (d.get("text_config") or {}).get("tie_word_embeddings", False))

    def tok(name, default):
      v = d.get(name, td.get(name, default))
      return None if v is None else int(v)

    eos = td.get("eos_token_id", d.get("eos_token_id", 151645))
    if isinstance(eos, list):
      eos = eos[0] if eos else None
    return cls(
        text=text, vision=vision, tie_word_embeddings=tie,
        image_token_id=tok("image_token_id", 151655), video_token_id=tok("video_token_id", 151656),
        vision_start_token_id=tok("vision_start_token_id", 151652),
        vision_end_token_id=tok("vision_end_token_id", 151653),
        bos_token_id=tok("bos_token_id", None), eos_token_id=None if eos is None else int(eos),
        pad_token_id=tok("pad_token_id", None), **runtime,
    )

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, **runtime) -> "Qwen2_5_VLConfig":
    """Reads `config.json` from a directory (or the file itself)."""
    p = os.fspath(path)
    if os.path.isdir(p):
      p = os.path.join(p, "config.json")
    if not os.path.exists(p):
      raise ConfigError(f"no config.json at {p}")
    with open(p) as f:
      return cls.from_hf_dict(json.load(f), **runtime)

  def to_hf_dict(self, dtype: str = "float32") -> dict[str, Any]:
    """The transformers-5 layout (`text_config.rope_parameters`)."""
    t, v = self.text, self.vision
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "dtype": dtype,
        "tie_word_embeddings": self.tie_word_embeddings,
        "image_token_id": self.image_token_id,
        "video_token_id": self.video_token_id,
        "vision_start_token_id": self.vision_start_token_id,
        "vision_end_token_id": self.vision_end_token_id,
        "text_config": {
            "model_type": "qwen2_5_vl_text",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "intermediate_size": t.intermediate_size,
            "rms_norm_eps": t.rms_norm_eps,
            "max_position_embeddings": t.max_position_embeddings,
            "hidden_act": t.hidden_act,
            "rope_parameters": {"rope_type": "default", "mrope_section": list(t.mrope_section),
                                "rope_theta": t.rope_theta},
            "use_sliding_window": False,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "dtype": dtype,
        },
        "vision_config": {
            "model_type": "qwen2_5_vl_vision",
            "depth": v.depth,
            "hidden_size": v.hidden_size,
            "num_heads": v.num_heads,
            "intermediate_size": v.intermediate_size,
            "out_hidden_size": v.out_hidden_size,
            "patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "in_channels": v.in_channels,
            "window_size": v.window_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes),
            "tokens_per_second": v.tokens_per_second,
            "hidden_act": v.hidden_act,
            "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
            "dtype": dtype,
        },
    }


def qwen2_5_vl_3b(**runtime) -> Qwen2_5_VLConfig:
  """Qwen2.5-VL-3B-Instruct shapes (PEERS.md §6.1): tied embeddings."""
  return Qwen2_5_VLConfig(
      text=TextConfig(vocab_size=151936, hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
                      num_key_value_heads=2, intermediate_size=11008),
      vision=VisionConfig(out_hidden_size=2048), tie_word_embeddings=True, **runtime)


def qwen2_5_vl_7b(**runtime) -> Qwen2_5_VLConfig:
  """Qwen2.5-VL-7B-Instruct shapes (PEERS.md §6.1)."""
  return Qwen2_5_VLConfig(
      text=TextConfig(vocab_size=152064, hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                      num_key_value_heads=4, intermediate_size=18944),
      vision=VisionConfig(out_hidden_size=3584), tie_word_embeddings=False, **runtime)
