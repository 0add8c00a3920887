/* The shared-page benchmark's producer in C (examples/shared-page/oomkit_shared_page.h):
 * a producer whose own cost does not hide the reader's.
 *
 *     pagepub DIR ROUNDS ACK_FD [CAPACITY RECORD_SIZE]
 *
 * Creates DIR/bench.ring and publishes ROUNDS oom records for "/bench" naming itself (its
 * pid and start time, which the reader checks against /proc), ringing the doorbell for each.
 * With ACK_FD >= 0 (an eventfd) it waits for the reader's ack after each record: latency.
 * With ACK_FD -1 it publishes as fast as it can: rate.  The ring is left in place.
 */
#define _GNU_SOURCE
#include <stdlib.h>

#include "oomkit_shared_page.h"

int main(int argc, char **argv)
{
    struct oomkit_ring ring;
    unsigned long rounds, capacity = 1024, record_size = 64;
    uint64_t ticks, ack;
    unsigned pid = (unsigned)getpid();
    int ack_fd, err;

    if (argc != 4 && argc != 6) {
        fprintf(stderr, "usage: %s DIR ROUNDS ACK_FD [CAPACITY RECORD_SIZE]\n", argv[0]);
        return 2;
    }
    rounds = strtoul(argv[2], NULL, 10);
    ack_fd = atoi(argv[3]);
    if (argc == 6) {
        capacity = strtoul(argv[4], NULL, 10);
        record_size = strtoul(argv[5], NULL, 10);
    }
    ticks = oomkit_start_ticks(pid);
    if (!ticks) {
        fprintf(stderr, "pagepub: cannot read its own start time\n");
        return 1;
    }
    err = oomkit_ring_create(&ring, argv[1], "bench", (uint32_t)capacity, (uint32_t)record_size);
    if (err < 0) {
        fprintf(stderr, "pagepub: creating the ring in %s: %s\n", argv[1], strerror(-err));
        return 1;
    }
    for (unsigned long i = 0; i < rounds; i++) {
        if (oomkit_publish(&ring, OOMKIT_KIND_OOM, OOMKIT_TREE_V1, pid, ticks, "/bench") < 0) {
            perror("pagepub: publish");
            return 1;
        }
        if (ack_fd >= 0 && read(ack_fd, &ack, sizeof(ack)) != sizeof(ack)) {
            perror("pagepub: reading the ack");
            return 1;
        }
    }
    oomkit_ring_close(&ring, 0);
    return 0;
}
