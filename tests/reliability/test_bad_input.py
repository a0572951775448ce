"""Bad input, end to end: each case gives a clear error (naming the file, row and field, or the setting),
and in skip mode the bad item is skipped and counted while every good one is still read.

Cases tested elsewhere are not repeated here (docs/reliability.md, "Bad input and security", lists where):
the readers' missing fields, broken image files and paths outside the root (tests/data/test_dataset_readers.py),
the grain pipeline's length budgets and undecodable images (tests/data/test_pipeline.py), image-token
mismatches in the model forward (tests/models), zero-variance GRPO groups (tests/training/test_grpo_*.py),
hung or crashing rewards (tests/rewards/test_rewards_pool.py), a judge answering 5xx, timing out or
replying garbage JSON (tests/rewards/test_rewards_judge.py), and the CLI's typo / other-config / missing-input
errors (tests/pipeline/test_pipeline_e2e.py).
"""

import base64
import http.server
import io
import json
import logging
import os
import socket
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from absl import flags
from ml_collections import config_flags
from PIL import Image

from specs_jax import config_defaults, pipeline
from specs_jax.data import sources
from specs_jax.data.types import DataError
from specs_jax.models import qwen2_5_vl
from specs_jax.processing import image
from specs_jax.rewards import judge as judge_lib
from data_readers import read

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def encoded(fmt: str, size=(40, 30), seed=0) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format=fmt)
  return buf.getvalue()


def write_jsonl(path, rows) -> str:
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
  return path


def virl(qid: str, **kw) -> dict:
  return {"qid": qid, "question": "<image>How many?", "answer": "\\boxed{3}", "image": ["images/ok.png"], **kw}


@pytest.fixture
def root(tmp_path):
  """A dataset root: one good image and the broken ones the rows below point at."""
  d = tmp_path / "ds"
  (d / "images").mkdir(parents=True)
  (d / "images" / "ok.png").write_bytes(encoded("PNG"))
  png, jpeg = encoded("PNG", (64, 64), 1), encoded("JPEG", (64, 64), 2)
  (d / "images" / "truncated.png").write_bytes(png[:len(png) * 2 // 3])
  (d / "images" / "truncated.jpg").write_bytes(jpeg[:len(jpeg) // 2])
  (d / "images" / "empty.png").write_bytes(b"")
  (d / "images" / "noise.png").write_bytes(np.random.default_rng(3).bytes(500))
  (d / "images" / "header_only.gif").write_bytes(b"GIF89a\x10\x00\x10\x00")
  return d


def assert_skipped(res, good_ids, skipped):
  """Every good row read, in order; the bad ones counted by reason."""
  assert [ex.id for ex in res.examples] == good_ids
  assert dict(res.skipped) == skipped and res.num_skipped == len(res.errors)


# ----------------------------------------------------------------------------------------------------------
# Corrupt and truncated images


def test_corrupt_and_truncated_images_are_bad_rows(root):
  truncated_b64 = base64.b64encode(encoded("PNG", (64, 64), 4)[:300]).decode()
  rows = [virl("good0"),
          virl("trunc_png", image=["images/truncated.png"]),
          virl("trunc_jpg", image=["images/truncated.jpg"]),
          virl("empty", image=["images/empty.png"]),
          virl("noise", image=["images/noise.png"]),
          virl("gif_header", image=["images/header_only.gif"]),
          virl("trunc_bytes", image=[{"bytes": truncated_b64, "path": "inline.png"}]),
          virl("not_base64", image=[{"bytes": "%%% not base64 %%%"}]),
          virl("good1")]
  path = write_jsonl(root / "rows.jsonl", rows)
  res = sources.read_rl_prompts(path, on_error="skip")
  assert_skipped(res, ["virl39k/good0", "virl39k/good1"], {"bad_image": 7})
  for k, err in enumerate(res.errors, start=1):
    assert str(err).startswith(f"{path}: row {k} (line {k + 1}): field 'image[0]': "), str(err)
  assert "truncated" in str(res.errors[1]).lower()  # PIL's own words for a cut JPEG are kept
  assert "not valid base64" in str(res.errors[6])
  with pytest.raises(DataError, match=r"rows\.jsonl: row 1 \(line 2\): field 'image\[0\]': cannot decode image"):
    sources.read_rl_prompts(path, on_error="fail")
  # Without the read-time check the rows are kept with lazy images; the grain pipeline rejects them when it
  # decodes them (tests/data/test_pipeline.py), and preprocessing one names the file.
  lazy = sources.read_rl_prompts(path, on_error="skip", check_images=False)
  assert len(lazy) == 8 and lazy.num_skipped == 1  # only the bad base64 is caught without decoding
  with pytest.raises(image.ImageError, match=r"truncated\.png.*truncated"):
    image.preprocess(lazy.examples[1].images[0].path)


# ----------------------------------------------------------------------------------------------------------
# Missing and mistyped fields, per reader

GOOD = {
    "rl": virl("q0"),
    "orsta": {"prompt": [{"role": "user", "content": "<image>Count."}], "images": ["images/ok.png"],
              "reward_model": {"ground_truth": "3"}, "extra_info": {"id": 7}},
    "pairs": {"conversations": [{"from": "human", "value": "<image>Q"}], "chosen": {"from": "gpt", "value": "a"},
              "rejected": {"from": "gpt", "value": "b"}, "images": ["images/ok.png"]},
    "mathvista": {"pid": "1", "question": "How long?", "image": "images/ok.png", "answer": "2",
                  "question_type": "free_form", "answer_type": "integer"},
    "mathverse": {"sample_index": "1", "question": "Q?", "image": "images/ok.png", "answer": "B",
                  "question_type": "multi-choice"},
    "mmmu": {"id": "v_Art_1", "question": "Q?", "options": "['x', 'y']", "answer": "A",
             "question_type": "multiple-choice", "image_1": "images/ok.png"},
    "generic": {"id": "g1", "question": "Q?", "images": ["images/ok.png"], "answer": "4", "answer_type": "integer"},
}


MISTYPED = [  # (reader, changes to the good row (None deletes), field named in the error, reason)
    ("rl", {"question": 17}, "question", "bad_value"),
    ("rl", {"question": None}, "question", "missing_field"),
    ("rl", {"answer": ["3"]}, "answer", "bad_answer_type"),
    ("rl", {"answer": True}, "answer", "bad_answer_type"),
    ("rl", {"image": 5}, "image", "bad_image"),
    ("rl", {"image": [{"path": 5}]}, "image[0]", "bad_image"),
    ("orsta", {"prompt": "Count."}, "prompt", "bad_value"),
    ("orsta", {"prompt": [{"role": "robot", "content": "x"}]}, "prompt[0]", "bad_value"),
    ("orsta", {"reward_model": ["3"]}, "reward_model", "bad_value"),
    ("orsta", {"reward_model": {"ground_truth": {"x": 1}}}, "reward_model.ground_truth", "bad_answer_type"),
    ("pairs", {"chosen": "a"}, "chosen", "bad_value"),
    ("pairs", {"conversations": {"from": "human"}}, "conversations", "bad_value"),
    ("pairs", {"images": "images/ok.png", "conversations": [{"from": "human", "value": "Q"}]}, "images",
     "image_count_mismatch"),
    ("mathvista", {"query": 5}, "query", "bad_value"),
    ("mathvista", {"precision": float("nan")}, "precision", "bad_value"),
    ("mathvista", {"precision": float("inf")}, "precision", "bad_value"),
    ("mathvista", {"precision": "2"}, "precision", "bad_value"),
    ("mathvista", {"answer_type": "complex"}, "answer_type", "bad_answer_type"),
    ("mathverse", {"query_cot": ["Q?"]}, "query_cot", "bad_value"),
    ("mathverse", {"answer": "maybe"}, "answer", "bad_answer_type"),
    ("mmmu", {"options": "{[]: 1}"}, "options", "bad_value"),
    ("mmmu", {"options": "[" * 500 + "]" * 500}, "options", "bad_value"),
    ("mmmu", {"options": "__import__('os')"}, "options", "bad_value"),
    ("generic", {"answer_type": ["integer"]}, "answer_type", "bad_answer_type"),
    ("generic", {"answer": "four"}, "answer", "bad_answer_type"),
    ("generic", {"id": None}, "id", "missing_field"),
]


@pytest.mark.parametrize("kind,change,field,reason", MISTYPED,
                         ids=[f"{k}-{'-'.join(c)}" for k, c, _, _ in MISTYPED])
def test_missing_and_mistyped_fields_name_the_field(root, kind, change, field, reason):
  bad = {k: v for k, v in {**GOOD[kind], **change}.items() if v is not None}
  # json.dumps writes NaN / Infinity, which Python's json (and so the reader) accepts
  path = write_jsonl(root / "rows.jsonl", [GOOD[kind], bad, GOOD[kind]])
  res = read(kind, path, "skip")
  assert len(res) == 2 and dict(res.skipped) == {reason: 1}
  msg = str(res.errors[0])
  assert msg.startswith(f"{path}: row 1 (line 2): field {field!r}: ") and msg.endswith(f"[{reason}]"), msg
  with pytest.raises(DataError) as e:
    read(kind, path, "fail")
  assert (e.value.row, e.value.field, e.value.reason) == (1, field, reason)


# ----------------------------------------------------------------------------------------------------------
# Damaged files


def test_bad_lines_cost_one_row_each_and_unicode_separators_none(tmp_path):
  good = lambda qid, q="Q?": json.dumps({"qid": qid, "question": q, "answer": "1"}, ensure_ascii=False)  # noqa: E731
  data = b"\n".join([
      b"\xef\xbb\xbf" + good("bom").encode(),                   # line 1: a UTF-8 byte-order mark is ignored
      good("sep", "a\u2028b\u2029c\x85d").encode(),           # 2: one row, though str.splitlines sees four
      b'{"qid": "latin1", "question": "caf\xe9", "answer": "1"}',  # 3: not UTF-8
      b'{"qid": "big", "question": "Q", "answer": ' + b"9" * 5000 + b"}",  # 4: over Python's int-digit limit
      b"[" * 100_000 + b"]" * 100_000,                           # 5: deeper than the JSON parser recurses
      b'{"qid": "cut", "question": "Q',                          # 6: truncated
      b"",                                                       # 7: blank lines are not rows
      b"42",                                                     # 8: not an object
      good("crlf").encode() + b"\r",                             # 9: Windows line end
  ])
  path = tmp_path / "rows.jsonl"
  path.write_bytes(data)
  res = sources.read_rl_prompts(path, on_error="skip", check_images=False)
  assert [ex.id for ex in res] == ["virl39k/bom", "virl39k/sep", "virl39k/crlf"]
  assert res.examples[1].meta["question"] == "a\u2028b\u2029c\x85d"
  assert dict(res.skipped) == {"bad_json": 5}
  lines = [(e.row, e.line) for e in res.errors]
  assert lines == [(2, 3), (3, 4), (4, 5), (5, 6), (6, 8)]   # rows count non-blank lines, lines count all
  assert "not valid UTF-8" in str(res.errors[0]) and "4300 digits" in str(res.errors[1])
  assert "RecursionError" in str(res.errors[2])
  with pytest.raises(DataError, match=r"rows\.jsonl: row 2 \(line 3\): line is not valid UTF-8"):
    sources.read_rl_prompts(path, on_error="fail", check_images=False)


def test_damaged_json_array_and_parquet_files_are_clear_errors(tmp_path):
  deep = tmp_path / "deep.json"
  deep.write_text("[" * 100_000)
  with pytest.raises(DataError, match=r"deep\.json: invalid JSON array"):
    sources.read_rl_prompts(deep, on_error="skip")
  latin1 = tmp_path / "latin1.json"
  latin1.write_bytes(b'[{"question": "caf\xe9", "answer": "1"}]')
  with pytest.raises(DataError, match=r"latin1\.json: invalid JSON array: .*utf-8"):
    sources.read_rl_prompts(latin1, on_error="skip")
  # A parquet file whose pages are damaged part-way: pyarrow raises a bare OSError that names no file.
  rows = [{"qid": str(i), "question": f"question {i} " + "x" * 40, "answer": str(i)} for i in range(300)]
  good = tmp_path / "good.parquet"
  pq.write_table(pa.Table.from_pylist(rows), good, row_group_size=100, compression="none")
  data = bytearray(good.read_bytes())
  data[len(data) // 2:len(data) // 2 + 64] = b"\xff" * 64
  bad = tmp_path / "damaged.parquet"
  bad.write_bytes(bytes(data))
  with pytest.raises(DataError, match=r"damaged\.parquet: cannot read parquet file after row \d+"):
    sources.read_rl_prompts(bad, on_error="skip", check_images=False)
  cut = tmp_path / "cut.parquet"
  cut.write_bytes(bytes(data[:len(data) // 2]))
  with pytest.raises(DataError, match=r"cut\.parquet: cannot read parquet file"):
    sources.read_rl_prompts(cut, on_error="skip")


def test_image_paths_that_cannot_be_resolved_are_bad_rows(root):
  os.symlink(root / "images" / "loop", root / "images" / "loop")
  rows = [virl("nul", image=["images/a\x00.png"]), virl("long", image=["a" * 5000 + ".png"]),
          virl("deep", image=["x/" * 3000 + "y.png"]), virl("loop", image=["images/loop"]),
          virl("dir", image=["images"]), virl("empty", image=[""]), virl("good")]
  path = write_jsonl(root / "rows.jsonl", rows)
  res = sources.read_rl_prompts(path, on_error="skip")
  assert_skipped(res, ["virl39k/good"], {"bad_image": 6})
  assert "NUL" in str(res.errors[0]) and "cannot be resolved" in str(res.errors[1])
  assert all(f"row {k}" in str(e) and "field 'image[0]'" in str(e) for k, e in enumerate(res.errors))


# ----------------------------------------------------------------------------------------------------------
# Empty datasets


def test_empty_files_read_as_empty_and_empty_directories_are_errors(tmp_path):
  (tmp_path / "empty.jsonl").write_text("")
  (tmp_path / "blank.jsonl").write_text("\n  \n\n")
  (tmp_path / "empty.json").write_text("[]")
  res = sources.read_rl_prompts([tmp_path / "empty.jsonl", tmp_path / "blank.jsonl", tmp_path / "empty.json"])
  assert len(res) == 0 and res.num_skipped == 0 and len(res.files) == 3
  assert res.summary() == "read 0 rows from 3 file(s); skipped 0"
  (tmp_path / "nodata").mkdir()
  (tmp_path / "nodata" / "README.md").write_text("no data here")
  with pytest.raises(FileNotFoundError, match="nodata: no .parquet/.jsonl/.json files"):
    sources.read_preference_pairs(tmp_path / "nodata")


def test_coldstart_refuses_a_pairs_file_with_no_readable_pairs(tmp_path):
  from specs_jax.stages import coldstart

  wd = pipeline.Workdir(str(tmp_path))
  (tmp_path / "distill").mkdir()
  pairs = tmp_path / "distill" / "pairs.jsonl"
  pairs.write_text("")
  with pytest.raises(pipeline.PipelineError, match=r"pairs\.jsonl holds no readable preference pairs "
                                                   r"\(read 0 rows from 1 file\(s\); skipped 0\)"):
    coldstart.load_pairs(wd, "coldstart", "skip")
  write_jsonl(pairs, ["not json", {"conversations": []}, {**GOOD["pairs"], "images": ["../../etc/passwd"]}])
  with pytest.raises(pipeline.PipelineError, match=r"skipped 3 \(bad_json: 1, bad_value: 1, "
                                                   r"image_outside_root: 1\)"):
    coldstart.load_pairs(wd, "coldstart", "skip")
  with pytest.raises(DataError, match=r"pairs\.jsonl: row 0 \(line 1\): invalid JSON"):
    coldstart.load_pairs(wd, "coldstart", "fail")


def test_rl_stage_refuses_prompt_files_with_no_readable_prompts(tmp_path):
  from specs_jax.stages import common

  config = config_defaults.base_config()
  config.data.source = "files"
  config.data.rl_prompts = (str(write_jsonl(tmp_path / "rl.jsonl", [{"question": 3}, "{"])),)
  with pytest.raises(ValueError, match=r"rl\.jsonl'\] hold no readable RL prompts \(read 0 rows from 1 file\(s\); "
                                       r"skipped 2 \(bad_json: 1, bad_value: 1\)\)"):
    common.rl_examples(config, "train", 8)


# ----------------------------------------------------------------------------------------------------------
# Image-token count mismatch, on the host (prepare_inputs), before anything is compiled


def test_prepare_inputs_names_the_image_token_mismatch():
  config = qwen2_5_vl.qwen2_5_vl_3b()
  img = config.image_token_id
  grid = np.array([[1, 4, 4]])                    # 16 patches, merged 2x2 -> 4 image tokens
  ids = np.array([[1, 2, img, img, img, img, 3], [1, 2, 3, 4, 5, 6, 7]])
  mask = np.ones_like(ids)
  qwen2_5_vl.prepare_inputs(config, ids, mask, grid, slot_size="auto")   # consistent: fine
  short = ids.copy()
  short[0, 2] = 5
  with pytest.raises(ValueError, match=r"3 <\|image_pad\|> tokens \(per sample \[3, 0\]\) but image_grid_thw "
                                       r"\[\[1, 4, 4\]\] gives 4 image features"):
    qwen2_5_vl.prepare_inputs(config, short, mask, grid, slot_size="auto")
  with pytest.raises(ValueError, match=r"4 <\|image_pad\|> tokens .* gives 0 image features"):
    qwen2_5_vl.prepare_inputs(config, ids, mask, None)              # tokens, but no image
  padded = mask.copy()
  padded[0, 2] = 0                                # an image token under the padding mask does not count
  with pytest.raises(ValueError, match="image token count mismatch"):
    qwen2_5_vl.prepare_inputs(config, ids, padded, grid, slot_size="auto")


# ----------------------------------------------------------------------------------------------------------
# A judge that is down or answers garbage: no verdict (score None, error says why), never an exception


class GarbageServer:
  """Answers every chat-completions POST with one scripted (status, body) reply."""

  def __init__(self, status: int, body: bytes):
    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    class Server(http.server.ThreadingHTTPServer):
      daemon_threads = True

    self.httpd = Server(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
    threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


def fast_judge(url: str, tmp_path) -> judge_lib.OpenAIJudge:
  return judge_lib.OpenAIJudge(judge_lib.JudgeConfig(base_url=url, api_key_env="SPECS_UNSET_KEY", timeout_s=2.0,
                                                     max_retries=1, backoff_s=0.01, max_backoff_s=0.02,
                                                     cache_dir=str(tmp_path / "cache")))


ANSWER = "<think> 2+2 </think><answer> The answer is $\\boxed{4}$</answer>"


@pytest.fixture
def no_proxy(monkeypatch):
  for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
    monkeypatch.delenv(var, raising=False)


def test_judge_that_is_down_gives_no_verdict(tmp_path, no_proxy, caplog):
  with socket.socket() as s:                     # a port nobody listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  j = fast_judge(f"http://127.0.0.1:{port}/v1", tmp_path)
  t0 = time.perf_counter()
  with caplog.at_level(logging.WARNING, logger="specs_jax.rewards.judge"):
    graded = j.grade_answers(["2+2?"], [ANSWER], ["4"])
    checked = j.check_consistency(["2+2?"], [ANSWER])
  assert time.perf_counter() - t0 < 5.0
  for v in graded + checked:
    assert v.score is None and "Connection refused" in v.error and f":{port}/v1" in v.error
  assert j.counters["failures"] == 2 and "failed for good" in caplog.text
  assert not (tmp_path / "cache").exists()       # failures are never cached


GARBAGE = {
    "empty_choices": (200, b'{"choices": []}'),
    "null_content": (200, b'{"choices": [{"message": {"content": null}}]}'),
    "dict_content": (200, b'{"choices": [{"message": {"content": {"correct": true}}}]}'),
    "not_utf8": (200, b"\xff\xfe\x00garbage"),
    "json_list": (200, b"[1, 2, 3]"),
    "empty_body": (200, b""),
    "html_502": (502, b"<html>bad gateway</html>"),
    "verdict_wrong_key": (200, json.dumps({"choices": [{"message": {"content": '{"consistent": true}'}}]}).encode()),
    "verdict_prose": (200, json.dumps({"choices": [{"message": {"content": "It depends " * 500}}]}).encode()),
}


@pytest.mark.parametrize("status,body", list(GARBAGE.values()), ids=list(GARBAGE))
def test_judge_garbage_reply_gives_no_verdict(tmp_path, no_proxy, status, body):
  server = GarbageServer(status, body)
  try:
    (v,) = fast_judge(server.url, tmp_path).grade_answers(["2+2?"], [ANSWER], ["4"])
  finally:
    server.close()
  assert v.score is None and v.error
  if status == 200 and body.startswith(b'{"choices": [{"message": {"content": "'):
    assert "unreadable verdict" in v.error and v.source == "judge"   # a reply, just not a verdict
  else:
    assert v.raw is None


# ----------------------------------------------------------------------------------------------------------
# Config keys that do not exist, and values of the wrong type


def parse_overrides(*overrides: str):
  """Parses `--config=configs/test.py` plus overrides as `main.py` does (locked config), in process."""
  fv = flags.FlagValues()
  argv = ["main", "--config=" + os.path.join(ROOT, "configs", "test.py"), *overrides]
  config_flags.DEFINE_config_file("config", None, "Config file.", flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  return fv.config


def test_config_overrides_with_unknown_keys_or_wrong_types_are_errors():
  assert parse_overrides("--config.coldstart.beta=0.5").coldstart.beta == 0.5
  with pytest.raises(AttributeError, match='Did you mean "beta" instead of "betta"'):
    parse_overrides("--config.coldstart.betta=0.5")
  with pytest.raises(KeyError, match="cold_start"):
    parse_overrides("--config.cold_start.beta=0.5")
  with pytest.raises(flags.IllegalFlagValueError, match=r"coldstart\.epochs=1\.5: invalid literal for int"):
    parse_overrides("--config.coldstart.epochs=1.5")
  with pytest.raises(flags.IllegalFlagValueError, match=r"coldstart\.beta=high: could not convert"):
    parse_overrides("--config.coldstart.beta=high")


def test_unknown_field_set_inside_a_config_file_is_refused(tmp_path):
  config = parse_overrides()
  assert config_defaults.unknown_fields(config) == []
  config.unlock()
  config.coldstart.betta = 0.5                   # what a typo in a config file does: a new, unread field
  config.grpo = {"group_size": 4}                # a whole section that does not exist
  assert config_defaults.unknown_fields(config) == ["coldstart.betta (did you mean coldstart.beta?)", "grpo"]
  with pytest.raises(pipeline.PipelineError, match=r"not in the schema .*: coldstart\.betta \(did you mean "
                                                   r"coldstart\.beta\?\), grpo"):
    pipeline.run(config, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()          # refused before the workdir is touched


# ----------------------------------------------------------------------------------------------------------
# A workdir made by another config


def test_workdir_of_another_config_is_refused_and_left_unchanged(tmp_path):
  wd = pipeline.Workdir(str(tmp_path / "wd"))
  config = config_defaults.base_config()
  pipeline.check_or_write_config(config, wd)
  saved = (tmp_path / "wd" / "config.json").read_text()
  pipeline.check_or_write_config(config, wd)                 # the same config again: fine
  config.run.progress = False                                 # run.* may differ (display, stage list)
  pipeline.check_or_write_config(config, wd)
  other = config_defaults.base_config()
  other.coldstart.beta, other.seed = 0.5, 1
  with pytest.raises(pipeline.PipelineError, match=r"made by a different config \(sections differ: "
                                                   r"\['coldstart', 'seed'\]\)"):
    pipeline.check_or_write_config(other, wd)
  assert json.loads((tmp_path / "wd" / "config.json").read_text())["coldstart"] == json.loads(saved)["coldstart"]
