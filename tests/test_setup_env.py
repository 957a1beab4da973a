"""What scripts/setup_env.sh sets for every command, and that torch honours it."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")

# Allocates one 64 MB tensor, touches every page and prints how many kB of the process's anonymous
# memory the kernel backs with huge pages, before and after.
HUGE_PAGES_OF_A_TENSOR = """
import re, torch
def huge_kb():
    text = open("/proc/self/smaps_rollup").read()
    return int(re.search(r"AnonHugePages:\\s+(\\d+) kB", text).group(1))
before = huge_kb()
x = torch.ones(16 * 2**20)
print(before, huge_kb())
"""


def _huge_kb_grown(thp_alloc: str) -> int:
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": thp_alloc}
    out = subprocess.run([sys.executable, "-c", HUGE_PAGES_OF_A_TENSOR], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    return int(out[1]) - int(out[0])


def test_setup_env_exports_huge_pages_for_torch_and_keeps_a_callers_choice():
    def exported(env):
        script = f'source "{ROOT}/scripts/setup_env.sh"; echo "THP=$THP_MEM_ALLOC_ENABLE"'
        out = subprocess.run(["bash", "-c", script], env=env, check=True, capture_output=True,
                             text=True).stdout
        return re.search(r"THP=(\S*)", out).group(1)

    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    assert exported(env) == "1"
    assert exported({**env, "THP_MEM_ALLOC_ENABLE": "0"}) == "0"


def test_torch_backs_large_cpu_tensors_with_huge_pages_when_asked():
    mode = THP_MODE.read_text() if THP_MODE.exists() else "[never]"
    if "[never]" in mode:
        pytest.skip(f"this kernel has transparent huge pages off ({THP_MODE}: {mode.strip()})")
    # the 64 MB tensor: at least half of it in 2 MB pages when torch asks for them
    assert _huge_kb_grown("1") >= 32 * 1024
    if "[madvise]" in mode:  # huge pages only where asked: without the setting, (almost) none
        assert _huge_kb_grown("0") < 8 * 1024
