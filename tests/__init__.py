"""The test suite. Imported before any conftest, hence before torch and numpy load libgomp."""

import os

# An idle OpenMP thread sleeps at once instead of spinning for a while first (libgomp reads this
# once, when torch loads it; subprocess servers inherit it). The tests run torch's 2-thread teams
# beside server subprocesses, in-process services' worker threads and drawing processes on 2
# cores, where a spinning thread holds the core that its team's other thread waits for: a test of
# many small ops (DFF's NMF in tests/cam/test_classes.py) took 4 to 20 s instead of 1 s while
# another process was busy. It changes how idle threads wait, never thread counts or results.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
