"""How many processes to run by default."""

import os


def usable_cores(at_most: int = 4) -> int:
    """The cores this process may run on (a container's or taskset's share, not the host's),
    at most `at_most`: beyond that, each process's copy of the model costs more memory than the
    extra core saves on this project's workloads."""
    return max(1, min(at_most, len(os.sched_getaffinity(0))))
