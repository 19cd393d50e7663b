"""``import tinyseek`` turns on PyTorch's huge-page advice for large CPU tensors (THP_MEM_ALLOC_ENABLE):
re-allocating a large tensor then faults it in 2 MB pages instead of 4 KB ones."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

def fault_probe(setup: str) -> str:
    """A script that runs ``setup`` (which imports torch), then prints the minor page faults of five
    40 MB tensors each freed and allocated again (as a training step does)."""
    return setup + r"""
import resource
def fresh():  # 40 MB: above glibc's default largest mmap threshold (32 MB)
    x = torch.empty(10 * 2**20).fill_(1.0); del x
fresh()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    fresh()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


PROBE = fault_probe("import tinyseek, torch")
PAGES = 5 * 40 * 2**20 // 4096  # what five 40 MB allocations fault in 4 KB pages


def _faults(env_value: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if env_value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "none"
    return text[text.index("[") + 1:text.index("]")] if "[" in text else "none"


def test_import_sets_the_switch_without_overriding_the_user():
    code = "import os, tinyseek; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "1"
    env["THP_MEM_ALLOC_ENABLE"] = "0"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "0"


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always") or sys.platform != "linux",
                    reason="transparent huge pages not available")
def test_large_allocations_fault_in_huge_pages():
    with_thp, without = _faults(None), _faults("0")
    assert without > 0.9 * PAGES or _thp_mode() == "always"  # 4 KB pages (unless the system forces THP)
    assert with_thp < PAGES // 4
