"""Loaded at start-up by every Python process whose PYTHONPATH starts with this folder (tests/float64_runs.py's
FLOAT64_ENV): with ACCUVQA_TEST_FLOAT64=1, the process trains and evaluates in float64."""

import os
import sys

if os.environ.get("ACCUVQA_TEST_FLOAT64") == "1":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import float64_runs

    float64_runs.enable()
    del sys.path[0]
