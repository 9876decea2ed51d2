"""The `aha` process's malloc settings (aha/infra/model.py `return_freed_memory_to_the_os`): freed
logits-sized blocks go back to the OS, which glibc's defaults do not guarantee. Each case runs in
a fresh interpreter, so that this test process's own heap does not matter."""

import subprocess
import sys

import pytest

SCRIPT = """
import sys, torch
from aha.infra.model import return_freed_memory_to_the_os
from aha.core.plan import process_rss
if sys.argv[1] == "tuned":
    assert return_freed_memory_to_the_os()
base = process_rss()
for _ in range(4):
    logits = torch.ones(4 << 20)          # 16 MB of fp32 logits (a chunk is up to 32 MB, aha/core/logprobs.py)
    del logits
print((process_rss() - base) >> 20)
"""


def grown_mib(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc are Linux's")
def test_freed_logit_chunks_go_back_to_the_os():
    assert grown_mib("tuned") <= 4
    # glibc's default raises its mmap threshold to 16 MB once such a block is freed, and keeps the
    # next one in its heap: the settings are what returns it
    assert grown_mib("default") >= 12


FAULTS = """
import resource, sys, torch
from aha.infra.model import return_freed_memory_to_the_os
assert return_freed_memory_to_the_os(**({"threshold": 1 << 20} if sys.argv[1] == "1MB" else {}))
for _ in range(3):
    torch.ones(1 << 20)                   # warm the heap up
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    activation = torch.ones(1 << 20)      # 4 MB, an activation-sized block
    del activation
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux's")
def test_activation_sized_blocks_are_reused_not_faulted_in_again():
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])
    # 50 blocks of 1,024 pages: with a 1 MB mmap threshold each one is a fresh mapping, faulted in page by page
    assert faults("1MB") >= 50 * 1024 * 0.9
    assert faults("tuned") < 50 * 1024 * 0.1
