"""tinyseek/malloc.py: training processes keep big CPU buffers mapped between steps."""
from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import sys
import types

import pytest

from tinyseek import cli, malloc
from test_hugepages import fault_probe

PROBE = fault_probe("from tinyseek import malloc\nprint(malloc.tune())\nimport torch")
# where a 40 MB tensor's block lives: inside glibc's brk heap (kept mapped when freed) or a mapping of its own
WHERE = """from tinyseek import malloc
print(malloc.tune())
import torch
x = torch.empty(10 * 2**20)
p = x.data_ptr()
heap = [tuple(int(v, 16) for v in line.split()[0].split("-")) for line in open("/proc/self/maps") if "[heap]" in line]
print(any(lo <= p < hi for lo, hi in heap))
"""

glibc = pytest.mark.skipif(platform.system() != "Linux" or not malloc.is_glibc(), reason="glibc only")


def _run(script: str, tune: str) -> tuple[str, str]:
    env = dict(os.environ, TINYSEEK_MALLOC_TUNE=tune)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    lines = out.stdout.split("\n")
    return lines[0], lines[1]


@glibc
def test_tuned_process_keeps_big_buffers_on_the_heap():
    """Tuned, a 40 MB tensor is carved from the brk heap, which ``free`` keeps mapped (up to the 1 GB
    trim threshold); with glibc's defaults it is a mapping of its own, unmapped on free and faulted in
    afresh by every re-allocation. (Whether the next 40 MB block lands on the freed one's pages
    depends on the heap's fragmentation: small allocations carved from the freed block, or THP's
    2 MB alignment slack, send it to fresh pages: measured 1 to 2,660 faults for five re-allocations
    from one process to the next on this machine, so page faults are not asserted here.)"""
    said, on_heap = _run(WHERE, "1")
    assert said in ("{'mmap_threshold_mb': 64, 'trim_threshold_mb': 1024}",
                    "{'mmap_threshold_mb': 32, 'trim_threshold_mb': 1024}")
    off_said, off_heap = _run(WHERE, "0")
    assert off_said == "None" and off_heap == "False"  # switched off: glibc defaults, a mapping of its own
    if "64" in said:  # a 32 MB threshold still maps 40 MB: no claim
        assert on_heap == "True"
    # and with the defaults every re-allocation faults its pages in afresh (>= 20 faults each even with 2 MB pages)
    assert int(_run(PROBE, "0")[1]) >= 5 * 20


def test_training_stages_tune_malloc_others_do_not(monkeypatch):
    @dataclasses.dataclass
    class Config:
        def validate(self):
            return self

    calls = []
    mod = types.SimpleNamespace(Config=Config, preset=lambda name: Config(), main=lambda cfg: "ran")
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: mod)
    from tinyseek import malloc
    monkeypatch.setattr(malloc, "tune", lambda: calls.append(1))
    assert cli.run_stage("pretrain", []) == "ran" and calls == [1]
    assert cli.run_stage("serve", []) == "ran" and calls == [1]
    assert cli.TRAINING_STAGES <= set(cli.STAGES)
