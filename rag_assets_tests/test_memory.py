"""Memory a step freed goes back to the system, so the steps of one run do not stack their peaks."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_freed_memory_is_handed_back() -> None:
    script = textwrap.dedent(
        """
        from rag_assets.common.memory import release_freed_memory

        def rss_mb():
            return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

        texts = [bytes(2000 + i % 7) for i in range(300_000)]  # 600 MB in glibc's heap
        texts = texts[::-1][:1]  # the rest freed, one kept at the end of the heap
        before = rss_mb()
        release_freed_memory()
        print(before, rss_mb())
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    before, after = map(float, result.stdout.split())
    assert before - after > 400, (before, after)
