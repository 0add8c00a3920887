"""A memory hog for integration tests: touches N MiB in chunks, says so, then waits.

    python hog.py MIB [--chunk MIB] [--rate MIB_PER_S] [--hold]

Prints "ready <pid>" once it has started, and "done" once every page is touched.  Memory is
touched with writes to an anonymous mmap, so every page is really charged.
"""

import argparse
import mmap
import os
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mib", type=int)
    ap.add_argument("--chunk", type=int, default=1)
    ap.add_argument("--rate", type=float, default=0.0, help="MiB/s; 0 = as fast as possible")
    ap.add_argument("--hold", action="store_true", help="wait forever once done")
    args = ap.parse_args()
    print(f"ready {os.getpid()}", flush=True)
    chunks = []
    page = mmap.PAGESIZE
    start = time.monotonic()
    touched = 0
    while touched < args.mib:
        # Private anonymous memory, like a real heap: MAP_SHARED would be shmem, which
        # process_mrelease cannot free.
        m = mmap.mmap(-1, args.chunk << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for off in range(0, len(m), page):
            m[off] = 1
        chunks.append(m)
        touched += args.chunk
        if args.rate:
            lag = touched / args.rate - (time.monotonic() - start)
            if lag > 0:
                time.sleep(lag)
    print("done", flush=True)
    if args.hold:
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
