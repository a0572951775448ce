"""Security properties: weights only from safetensors, no model output (or data) run as code, judge keys
only from the environment, dataset image paths confined to the dataset root. docs/reliability.md ("Bad
input and security") states the trust model; the config-file half of it (configs are Python, run with your
privileges) is a documented rule, checked here only for being written down.
"""

import ast
import dataclasses
import json
import logging
import os
import pathlib
import pickle
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from specs_jax import config_defaults, pipeline, rewards
from specs_jax.data import sources
from specs_jax.data.types import DataError
from specs_jax.distill import parse
from specs_jax.distill.config import DistillConfig
from specs_jax.models import qwen2_5_vl
from specs_jax.rewards import judge as judge_lib
from specs_jax.rewards.judge_rules import RuleJudge

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "specs_jax"


# ----------------------------------------------------------------------------------------------------------
# Weights: safetensors only, a pickle file is never opened


class _Trap:
  """Unpickling this creates `path` (what a malicious pytorch_model.bin could do with os.system)."""

  def __init__(self, path: str):
    self.path = path

  def __reduce__(self):
    return os.mkdir, (self.path,)


def plant_pickles(d: pathlib.Path, marker: pathlib.Path) -> None:
  payload = pickle.dumps(_Trap(str(marker)))
  for name in ("pytorch_model.bin", "model.pt", "weights.pth", "training_args.bin"):
    (d / name).write_bytes(payload)


def test_weights_load_from_safetensors_and_never_unpickle(hf_dir, tmp_path):
  marker = tmp_path / "pwned"
  with_both = tmp_path / "both"
  shutil.copytree(hf_dir, with_both)
  plant_pickles(with_both, marker)
  _, params = qwen2_5_vl.from_pretrained(with_both)                  # the safetensors file is used ...
  tensors = load_file(with_both / "model.safetensors")
  embed = next(v for k, v in tensors.items() if k.endswith("embed_tokens.weight"))
  np.testing.assert_array_equal(params["model"]["embed_tokens"]["embedding"], embed)
  only_pickles = tmp_path / "only_pickles"
  only_pickles.mkdir()
  shutil.copy(os.path.join(hf_dir, "config.json"), only_pickles)
  plant_pickles(only_pickles, marker)
  with pytest.raises(qwen2_5_vl.WeightsError, match=r"only pickle checkpoints; .* safetensors only \(never pickle\)"):
    qwen2_5_vl.from_pretrained(only_pickles)
  assert not marker.exists()                                          # ... and no pickle was ever opened
  # The planted payload is live: unpickling it would have created the marker.
  pickle.loads((only_pickles / "pytorch_model.bin").read_bytes())
  assert marker.is_dir()


# ----------------------------------------------------------------------------------------------------------
# No code execution: a static scan of the package


# Calls that run code or unpickle data, by full dotted name (import aliases resolved).
DANGEROUS_CALLS = {
    "eval", "exec", "compile", "__import__", "breakpoint",
    "pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "dill.loads", "cloudpickle.load",
    "cloudpickle.loads", "joblib.load", "marshal.load", "marshal.loads", "shelve.open", "torch.load",
    "yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all",
    "os.system", "os.popen", "os.execv", "os.execve", "os.execvp", "os.execl", "os.spawnv", "os.spawnl",
    "code.interact", "code.InteractiveInterpreter", "runpy.run_path", "runpy.run_module",
    "sympy.sympify", "sympy.parse_expr", "sympy.parsing.sympy_parser.parse_expr", "sympy.parsing.parse_expr",
    "sympy.core.sympify.sympify", "math_verify.ExprExtractionConfig", "math_verify.parser.parse_expr",
    "importlib.import_module",
}
# Keyword arguments that make an otherwise safe call run code or unpickle.
DANGEROUS_KEYWORDS = {"shell": True, "allow_pickle": True, "trust_remote_code": True, "weights_only": False}
# Reviewed uses: (file relative to the repo, dotted name) -> why it is safe.
ALLOWED = {
    ("specs_jax/data/__init__.py", "importlib.import_module"):
        "PEP 562 lazy attributes: module names come from the constant _LAZY table, never from data",
    ("specs_jax/data/sources.py", "ast.literal_eval"):
        "MMMU options are a Python list literal; literal_eval builds literals only and runs no code",
}


def _aliases(tree: ast.AST) -> dict[str, str]:
  out = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
    elif isinstance(node, ast.ImportFrom) and node.module:
      for a in node.names:
        out[a.asname or a.name] = f"{node.module}.{a.name}"
  return out


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  if not isinstance(node, ast.Name):
    return None
  parts.append(aliases.get(node.id, node.id))
  return ".".join(reversed(parts))


def scan(source: str, filename: str) -> list[tuple[str, int, str]]:
  """(file, line, what) for every dangerous call, dangerous keyword, or mention of a dangerous name."""
  tree = ast.parse(source, filename)
  aliases = _aliases(tree)
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Call):
      name = _dotted(node.func, aliases)
      if name in DANGEROUS_CALLS or name == "ast.literal_eval":
        found.append((filename, node.lineno, name))
      for kw in node.keywords:
        if kw.arg in DANGEROUS_KEYWORDS and isinstance(kw.value, ast.Constant) \
            and kw.value.value == DANGEROUS_KEYWORDS[kw.arg]:
          found.append((filename, node.lineno, f"{name}({kw.arg}={kw.value.value})"))
    elif isinstance(node, (ast.Name, ast.Attribute)) and not isinstance(getattr(node, "ctx", None), ast.Store):
      name = _dotted(node, aliases)
      if name in ("math_verify.ExprExtractionConfig", "math_verify.parser.parse_expr"):
        found.append((filename, node.lineno, f"reference to {name}"))
  return found


def test_scanner_finds_what_it_looks_for():
  snippet = """
import pickle as pk, subprocess, yaml, numpy as np
from sympy import sympify as S
from math_verify import ExprExtractionConfig
eval(text); exec(code); pk.loads(blob); S(answer); yaml.load(s)
subprocess.run(cmd, shell=True); np.load(path, allow_pickle=True); cfg = ExprExtractionConfig
re.compile(r"fine"); yaml.safe_load(s); np.load(path); subprocess.run(["ls"])
"""
  found = {what for _, _, what in scan(snippet, "snippet.py")}
  assert found == {"eval", "exec", "pickle.loads", "sympy.sympify", "yaml.load", "subprocess.run(shell=True)",
                   "numpy.load(allow_pickle=True)", "reference to math_verify.ExprExtractionConfig"}


def test_package_runs_no_code_from_data_or_model_output():
  files = sorted(PACKAGE.rglob("*.py"))
  assert len(files) > 50
  found = []
  for f in files:
    rel = str(f.relative_to(ROOT))
    found += [(rel, line, what) for _, line, what in scan(f.read_text(encoding="utf-8"), rel)]
  unexpected = [f"{rel}:{line}: {what}" for rel, line, what in found if (rel, what) not in ALLOWED]
  assert unexpected == [], "dangerous calls (review them, then allow them in ALLOWED with a reason):\n" + \
      "\n".join(unexpected)
  assert {(rel, what) for rel, _, what in found} == set(ALLOWED)     # no stale allowance either


PAYLOADS = [
    "__import__('pathlib').Path('{m}').touch()",
    "exec(\"open('{m}', 'w')\")",
    "\\boxed{{__import__('os').system('touch {m}')}}",
    "$\\boxed{{eval(\"open('{m}','w')\")}}$",
    "{{!!python/object/apply:os.system ['touch {m}']}}",
    "{{{{ ''.__class__.__mro__[1].__subclasses__() }}}}",
]


def test_model_output_with_code_has_no_effect_anywhere_it_is_read(tmp_path):
  """Rewards, the offline judge and the distillation parser read responses full of code; none runs it.
  (tests/rewards/test_rewards_accuracy.py traps eval/exec on the accuracy path itself.)"""
  marker = tmp_path / "pwned"
  judge = RuleJudge()
  for p in PAYLOADS:
    code = p.format(m=marker)
    for text in (code, f"<think>{code}</think><answer>{code}</answer>",
                 f"<think>so</think><answer> The answer is $\\boxed{{{code}}}$</answer>"):
      assert rewards.format_reward(text) in (0.0, 1.0)
      assert rewards.accuracy_reward(text, "1") == 0.0 and rewards.accuracy_reward(text, "B") == 0.0
      rewards.extract_answer(text)
      judge.grade_answers(["Q?"], [text], ["1"])
      judge.check_consistency(["Q?"], [text])
      parse.final_answer(text)
      parse.split_response(text)
  assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------
# Judge keys: only from the environment, never in configs, reports, caches or logs

KEY = "sk-reliability-SECRET-42"
SECRET_NAME = ("api_key", "apikey", "secret", "password", "passwd", "credential", "bearer", "auth_token")


def _names(tree, prefix=""):
  for k in tree.keys():
    yield prefix + k
    if hasattr(tree[k], "keys"):
      yield from _names(tree[k], prefix + k + ".")


def test_no_config_field_can_hold_a_key():
  names = list(_names(config_defaults.base_config()))
  assert not [n for n in names if any(s in n.lower() for s in SECRET_NAME)], names
  fields = {f.name for f in dataclasses.fields(judge_lib.JudgeConfig)}
  assert {f for f in fields if "key" in f} == {"api_key_env"}             # the variable's name, not its value
  with pytest.raises(TypeError, match="api_key") as e:
    rewards.make_judge("openai", api_key=KEY)
  assert KEY not in str(e.value)


def test_key_stays_out_of_config_json_reprs_stats_errors_logs_and_cache(tmp_path, monkeypatch, caplog):
  import http.server
  import threading

  monkeypatch.setenv("SPECS_SECRET_JUDGE_KEY", KEY)
  for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
    monkeypatch.delenv(var, raising=False)
  seen = []

  class Echo(http.server.BaseHTTPRequestHandler):
    """A server that quotes the Authorization header back in a 401, as some proxies do."""

    def log_message(self, *args):
      pass

    def do_POST(self):
      self.rfile.read(int(self.headers["Content-Length"]))
      seen.append(self.headers.get("Authorization"))
      body = f'{{"error": "invalid credentials {self.headers.get("Authorization")}"}}'.encode()
      self.send_response(401)
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)

  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
  threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
  try:
    cfg = judge_lib.JudgeConfig(base_url=f"http://127.0.0.1:{httpd.server_address[1]}/v1",
                                api_key_env="SPECS_SECRET_JUDGE_KEY", max_retries=0, timeout_s=5.0,
                                cache_dir=str(tmp_path / "cache"))
    judge = judge_lib.OpenAIJudge(cfg)
    with caplog.at_level(logging.DEBUG):
      (v,) = judge.grade_answers(["Q"], ["<answer>\\boxed{1}</answer>"], ["1"])
  finally:
    httpd.shutdown()
    httpd.server_close()
  assert seen == [f"Bearer {KEY}"]                                       # the key went out, in the header only
  assert v.score is None and "HTTP 401" in v.error and "***" in v.error and KEY not in v.error
  distill_cfg = DistillConfig(judge="openai", judge_kwargs=dataclasses.asdict(cfg))
  wd = pipeline.Workdir(str(tmp_path / "wd"))
  pipeline.check_or_write_config(config_defaults.base_config(), wd)
  texts = {"log": caplog.text, "repr": repr(judge) + repr(cfg), "stats config": json.dumps(distill_cfg.to_dict()),
           "config.json": (tmp_path / "wd" / "config.json").read_text()}
  texts.update({str(p): p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file()})
  assert [name for name, text in texts.items() if KEY in text] == []


# ----------------------------------------------------------------------------------------------------------
# Dataset image paths stay inside the dataset root


@pytest.fixture
def dataset(tmp_path):
  """root/ with one good image, a symlink to a file outside it and a symlinked directory outside it;
  secret.png (a readable, valid image) sits next to the root."""
  from PIL import Image

  root = tmp_path / "ds"
  (root / "images").mkdir(parents=True)
  Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "images" / "ok.png")
  Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "secret.png")
  (tmp_path / "elsewhere").mkdir()
  Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "elsewhere" / "x.png")
  os.symlink(tmp_path / "secret.png", root / "images" / "link.png")
  os.symlink(tmp_path / "elsewhere", root / "linked_dir")
  return root


ESCAPES = ["../secret.png", "images/../../secret.png", "{abs}", "images/link.png", "linked_dir/x.png",
           "../../../../../../../../etc/passwd", "/etc/passwd"]

ROWS = {  # reader -> (row builder taking an image value, read function)
    "virl39k": (lambda im: {"question": "Q", "answer": "1", "image": [im]},
                lambda p, root: sources.read_rl_prompts(p, image_root=root)),
    "orsta": (lambda im: {"prompt": [{"role": "user", "content": "Q"}], "images": [{"path": im}],
                          "reward_model": {"ground_truth": "1"}},
              lambda p, root: sources.read_rl_prompts(p, image_root=root)),
    "pairs": (lambda im: {"conversations": [{"from": "human", "value": "<image>Q"}], "images": [im],
                          "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}},
              lambda p, root: sources.read_preference_pairs(p, image_root=root)),
    "mathvista": (lambda im: {"pid": "1", "question": "Q", "answer": "1", "image": im},
                  lambda p, root: sources.read_eval_benchmark(p, "mathvista", image_root=root)),
    "mmmu": (lambda im: {"id": "v_A_1", "question": "Q", "answer": "1", "image_1": {"path": im, "bytes": None}},
             lambda p, root: sources.read_eval_benchmark(p, "mmmu", image_root=root)),
}


@pytest.mark.parametrize("reader", list(ROWS))
def test_image_paths_outside_the_dataset_root_are_refused(dataset, reader):
  build, read = ROWS[reader]
  escapes = [e.format(abs=dataset.parent / "secret.png") for e in ESCAPES]
  path = dataset / "rows.jsonl"
  path.write_text("".join(json.dumps(build(im)) + "\n" for im in ["images/ok.png", *escapes, "images/ok.png"]))
  for root in (None, dataset):          # default root (the data file's directory) and an explicit one
    res = read(path, root)
    assert len(res) == 2 and dict(res.skipped) == {"image_outside_root": len(escapes)}, res.summary()
    for k, err in enumerate(res.errors, start=1):
      assert f"row {k} (line {k + 1})" in str(err) and ("outside" in str(err) or "absolute" in str(err))
  with pytest.raises(DataError, match=r"rows\.jsonl: row 1 \(line 2\): field .*\[image_outside_root\]"):
    _fail(reader, path)


def _fail(reader: str, path):
  if reader in ("virl39k", "orsta"):
    return sources.read_rl_prompts(path, on_error="fail")
  if reader == "pairs":
    return sources.read_preference_pairs(path, on_error="fail")
  return sources.read_eval_benchmark(path, reader, on_error="fail")


def test_a_symlink_inside_the_root_to_a_file_inside_it_is_fine(dataset):
  os.symlink(dataset / "images" / "ok.png", dataset / "images" / "alias.png")
  path = dataset / "rows.jsonl"
  path.write_text(json.dumps({"question": "Q", "answer": "1", "image": ["images/alias.png"]}) + "\n")
  (ex,) = sources.read_rl_prompts(path, on_error="fail").examples
  assert ex.images[0].path == str(dataset / "images" / "ok.png")    # resolved, then checked


# ----------------------------------------------------------------------------------------------------------
# Config files are code: the rule is written where users look


def test_config_trust_model_is_documented():
  doc = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
  section = doc.split("## Bad input and security", 1)[1].split("\n## ", 1)[0]
  assert "only config files you trust" in section and "safetensors" in section
  from specs_jax import main

  assert "use only config files you trust" in main.__doc__
