"""``python -m tests.guest prepare``: fill the guest cache (what ``make guest`` runs).

Prints what it prepared, or why the guest cannot be had here (exit status 1).
"""

from __future__ import annotations

import sys

from .image import Unavailable, prepare


def main(argv: list[str]) -> int:
    if argv != ["prepare"]:
        print("usage: python -m tests.guest prepare", file=sys.stderr)
        return 2
    try:
        image = prepare()
    except Unavailable as exc:
        print(f"guest: not available: {exc}", file=sys.stderr)
        return 1
    print(f"guest: kernel {image.release} ({image.kernel}), initramfs {image.initrd.name}, {image.qemu}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
