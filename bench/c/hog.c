/* benchhog: touches anonymous memory page by page and stamps its progress in a shared file.
 *
 *     benchhog MIB [RATE_MIB_PER_S] [STAMP_FILE]
 *
 * After every page it writes CLOCK_MONOTONIC and the page count into STAMP_FILE (mapped
 * shared), so when the allocation stalls at a memcg limit, the last stamp says when the
 * last page that still fit was charged: the next fault is the one that hits the limit.
 * Stamping costs a vDSO clock read per page, against a page fault of 1 to 10 us.
 * RATE 0 touches as fast as it can; otherwise it paces itself per MiB.  Once done it
 * waits forever.  Its name (comm) "benchhog" is what every daemon is pointed at.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

struct stamp {
    volatile uint64_t start_ns, last_ns, pages, done;
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: benchhog MIB [RATE_MIB_PER_S] [STAMP_FILE]\n");
        return 2;
    }
    long mib = atol(argv[1]);
    double rate = argc > 2 ? atof(argv[2]) : 0.0;
    static struct stamp local;
    struct stamp *st = &local;
    if (argc > 3) {
        int fd = open(argv[3], O_RDWR);
        if (fd < 0 || (st = mmap(NULL, sizeof *st, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)) == MAP_FAILED) {
            perror(argv[3]);
            return 1;
        }
    }
    long page = sysconf(_SC_PAGESIZE);
    size_t chunk = 1 << 20;
    st->start_ns = st->last_ns = now_ns();
    for (long i = 0; i < mib; i++) {
        /* Private anonymous memory, like a heap: one mapping per MiB, never freed. */
        char *m = mmap(NULL, chunk, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) {
            perror("mmap");
            return 1;
        }
        for (size_t off = 0; off < chunk; off += page) {
            m[off] = 1;
            st->last_ns = now_ns();
            st->pages++;
        }
        if (rate > 0) {
            double due = (double)st->start_ns + (i + 1) / rate * 1e9;
            double lag = due - (double)now_ns();
            if (lag > 0) {
                struct timespec ts = {(time_t)(lag / 1e9), (long)((uint64_t)lag % 1000000000u)};
                nanosleep(&ts, NULL);
            }
        }
    }
    st->done = 1;
    for (;;)
        pause();
}
