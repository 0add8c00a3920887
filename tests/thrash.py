"""Page-cache thrashing for pressure tests: mmap-reads a file larger than the memcg limit.

    python thrash.py FILE MIB [--seconds S]

Creates FILE (MIB MiB) if it is missing or too small, drops its cached pages (pages already
cached stay charged to whoever cached them, so the reads below must miss), prints
"ready <pid>", then reads every page in a loop until killed or S seconds pass.
"""

import argparse
import mmap
import os
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("mib", type=int)
    ap.add_argument("--seconds", type=float, default=0.0, help="0 = until killed")
    args = ap.parse_args()
    size = args.mib << 20
    if not os.path.exists(args.file) or os.path.getsize(args.file) < size:
        with open(args.file, "wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(args.mib):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
    fd = os.open(args.file, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    m = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    print(f"ready {os.getpid()}", flush=True)
    page = mmap.PAGESIZE
    end = time.monotonic() + args.seconds if args.seconds else None
    total = 0
    while end is None or time.monotonic() < end:
        for off in range(0, size, page):
            total += m[off]
    print(f"done {total & 0xff}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
