"""Running a test process out of file descriptors, for real: the kernel's own EMFILE."""

from __future__ import annotations

import contextlib
import os
import resource
from collections.abc import Iterator


@contextlib.contextmanager
def descriptors_left(n: int) -> Iterator[None]:
    """Only ``n`` more descriptors can be opened inside (the soft ``RLIMIT_NOFILE`` just
    above those open, their gaps filled), as an embedding service holding many sockets
    would leave its oomkit engine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    fillers = []  # the gaps below the highest descriptor, which the kernel would hand out first
    while (fd := os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)) < top:
        fillers.append(fd)
    os.close(fd)
    resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1 + n, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for fd in fillers:
            os.close(fd)
