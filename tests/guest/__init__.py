"""Tests in a guest kernel with a real cgroup v2 memory controller.

This machine's cgroup v2 hierarchy has no memory controller (and cgroup v1 is leaving), so
the v2 code is tested in a small QEMU guest: Debian's 6.1 kernel (``apt-get download``,
never installed here) under QEMU's software CPU, the host's ``/`` shared read-only over
virtio-9p with a tmpfs overlay for writes, cgroup2 mounted with every controller enabled
below the root, and an agent on a virtio-serial port that runs commands.  Guest code is the
checkout itself, run by this very interpreter seen through the 9p share.

- :mod:`.image` prepares the kernel, modules and initramfs once, cached in ``.cache/guest``;
- :mod:`.machine` boots QEMU and talks to the agent (:class:`Guest`, :class:`Process`);
- :mod:`.agent` is the agent (runs in the guest; standard library only);
- :mod:`.cgroup` makes and removes cgroups in the guest;
- ``init.sh`` is the guest's init (busybox sh).

``python -m tests.guest prepare`` fills the cache (``make guest``); ``python -m bench guest``
measures boot and command cost.

Why not virtme-ng (the kernel developers' tool, PyPI 1.42)?  It works here with
``--disable-kvm``, but takes 40-60 s per boot, about 30 s of it waiting for udev, and drives
the guest through a console shell whose exit codes and output we would have to parse.  This
runner boots to its agent in ~6 s because it starts nothing but the agent (no udev, no
systemd: a dozen modules loaded by hand, an uncompressed vmlinux so nothing decompresses in
emulation), and the agent returns exit status, stdout and stderr exactly, runs background
processes and reads and writes files in ~0.1 s per request.  What it costs us: this package
(~1100 lines) and a Debian host (apt-get, dpkg-deb) to fetch the kernel.  Boot speed is what
decides it: a boot per test that may wreck the guest stays affordable (``make test`` pays
four: the shared one and three for tests of the runner itself).

The agent is a Python script (the host's interpreter, started once with ``-I -S``; its
imports cost about a second of the boot) rather than a busybox shell loop: JSON lines with
base64 output, timeouts that kill a process group, and background processes are a page of
Python and would be fragile in sh.
"""

from .cgroup import ROOT, GuestCgroup
from .image import CACHE, Image, Unavailable, prepare
from .machine import (
    AgentProtocolError,
    CommandFailed,
    CommandTimeout,
    Guest,
    GuestDied,
    GuestError,
    GuestTimeout,
    Process,
    Result,
)

__all__ = [
    "CACHE",
    "ROOT",
    "AgentProtocolError",
    "CommandFailed",
    "CommandTimeout",
    "Guest",
    "GuestCgroup",
    "GuestDied",
    "GuestError",
    "GuestTimeout",
    "Image",
    "Process",
    "Result",
    "Unavailable",
    "prepare",
]
