"""tinyseek: the DeepSeek-R1 low-cost training recipe, end to end, at laptop scale."""

import os

# Must be set before torch loads libgomp. Its default busy-waiting makes multi-threaded torch ~20x
# slower when the cores are shared with other jobs (measured on 2 busy cores: cpu-tiny train step
# 15.5 s -> 0.67 s wall). Passive threads sleep instead. An explicit user setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
