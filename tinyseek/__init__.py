"""tinyseek: the DeepSeek-R1 low-cost training recipe, end to end, at laptop scale."""

import os

# Must be set before torch loads libgomp. Its default busy-waiting makes multi-threaded torch ~20x
# slower when the cores are shared with other jobs (measured on 2 busy cores: cpu-tiny train step
# 15.5 s -> 0.67 s wall). Passive threads sleep instead. An explicit user setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# PyTorch's own switch (read at its first CPU allocation, so also before torch loads): CPU tensors of
# 2 MB and more are madvise(MADV_HUGEPAGE)d. Large blocks are fresh mmaps from glibc on every
# allocation (above 32 MB always), and faulting one in 4 KB pages costs more than the work on it:
# allocating and filling 33 MB took 15.3 ms with 4 KB pages, 3.0 ms with huge pages (1 thread; the
# 64-expert MoE block's 33 MB weight gradient, fresh every step: 0.77-0.82x -> 0.81-0.86x of the
# dense FFN, see benchmarks/README.md). No effect where transparent huge pages are "never".
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
