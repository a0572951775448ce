"""Accuracy graders that misbehave on purpose, for the pool tests.

They live in their own module so that "spawn" workers can import them by name (tests/rewards is on
the path the parent hands to its children). The answer string only selects a behaviour by equality;
it is never evaluated.
"""

import os
import signal
import time

from specs_jax.rewards import accuracy


def misbehaving_grader(answer, gold, config):
  if answer == "HANG_IN_C":
    # Blocking SIGALRM stands in for a hang inside C code, which no Python signal handler reaches:
    # only the parent's kill can end it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(600)
  if answer == "SLOW":
    time.sleep(600)                      # interruptible: the worker's own itimer ends it
  if answer == "CRASH":
    os._exit(3)
  if answer == "HOG":
    bytearray(16 * 2**30)                # over the pool's default worker_memory_mb (4 GiB)
  if answer == "RAISE":
    raise RuntimeError("grader bug")
  return accuracy.grade_answer(answer, gold, config)
