"""specs_jax.host.configure_malloc: XLA:CPU's large buffers are reused instead of re-faulted."""

import json
import os
import subprocess
import sys

import pytest

_PROBE = r"""
import json, resource, sys
from specs_jax import host
applied = host.configure_malloc()
import jax, jax.numpy as jnp
x = jnp.ones((16, 1024, 1024))                     # 64 MB: above glibc's 32 MB mmap threshold
f = jax.jit(lambda x: jnp.sin(x) * 2 + 1)
faults = []
for _ in range(60):                                # the heap settles first (measured: within 6-16 calls)
  r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _probe(env_value):
  env = dict(os.environ, SPECS_JAX_MALLOC_TUNING=env_value, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_configure_malloc_stops_page_faults_on_repeated_calls():
  """A jitted call whose 64 MB output is freed and allocated again: with the tuning the memory is
  reused once the heap has settled (no page faults in the last 10 of 60 calls; in 6 runs it settled
  after 6-16 calls); without it every call faults the 16k pages in again (measured 16,385)."""
  on, off = _probe("1"), _probe("0")
  assert on["applied"] is True and off["applied"] is False
  pages = 16 * 1024 * 1024 * 4 // 4096
  assert max(on["faults"][-10:]) < pages // 100, on["faults"]
  assert min(off["faults"][-10:]) > pages // 2, off["faults"]


_BIG_PROBE = r"""
import ctypes, json, resource
from specs_jax import host
applied = host.configure_malloc()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
size = 5 << 29                                      # 2.5 GB: above the old 2 GB trim threshold
faults = []
for _ in range(3):
  r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  p = libc.malloc(size)
  ctypes.memset(p, 1, size)                        # touch every page
  libc.free(p)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(json.dumps({"applied": applied, "faults": faults}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_configure_malloc_keeps_freed_gigabytes():
  """The heap is never trimmed: a 2.5 GB block (the GRPO update at config S frees ~2.7 GB of
  temporaries per call) is reused without faulting its 655k pages in again. With a 2 GB trim
  threshold, or without the tuning, each allocation faults them all."""
  env = dict(os.environ, SPECS_JAX_MALLOC_TUNING="1", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _BIG_PROBE], capture_output=True, text=True, env=env,
                       timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert out.returncode == 0, out.stderr[-2000:]
  got = json.loads(out.stdout.strip().splitlines()[-1])
  pages = (5 << 29) // 4096
  assert got["applied"] is True
  assert got["faults"][0] > pages // 2, got                # the first touch faults, as it must
  assert max(got["faults"][1:]) < pages // 100, got
