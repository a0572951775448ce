"""Puts tests/rewards on sys.path so `reward_test_graders` imports here and in spawned grading workers
(spawn hands the parent's sys.path to its children)."""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
  sys.path.insert(0, _HERE)
