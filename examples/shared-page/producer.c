/* A shared-page producer with no Python in it: publishes events for a process into a ring.
 *
 *     cc -O2 -std=c11 -o producer producer.c
 *     ./producer [-n COUNT] [-k KIND] [-t v1|v2|system] [-c CAPACITY] [-r RECORD_SIZE]
 *                [-v NAME=VALUE ...] DIR NAME PID CGROUP
 *
 * Creates DIR/NAME.ring, reads PID's start time (oomkit_start_ticks: field 22 of its
 * /proc/PID/stat) so that the reader can tell the process from a later one with the same
 * pid, publishes COUNT records (default 1) of KIND (default 1, oom) for CGROUP as /proc/PID/cgroup names it, and leaves
 * the ring in place so a reader that starts later still finds the records.  Each -v adds
 * a value to every record (up to 8).  Prints the last sequence number.
 */
#define _GNU_SOURCE
#include <stdlib.h>

#include "oomkit_shared_page.h"

int main(int argc, char **argv)
{
    unsigned long count = 1, kind = OOMKIT_KIND_OOM, capacity = 256, record_size = 512;
    enum oomkit_tree tree = OOMKIT_TREE_V1;
    struct oomkit_ring ring;
    struct oomkit_value values[8];
    uint16_t nvalues = 0;
    char *eq;
    unsigned pid;
    uint64_t ticks;
    int64_t seq = 0;
    int opt, err;

    memset(values, 0, sizeof(values));
    while ((opt = getopt(argc, argv, "n:k:t:c:r:v:")) != -1) {
        switch (opt) {
        case 'n': count = strtoul(optarg, NULL, 10); break;
        case 'k': kind = strtoul(optarg, NULL, 10); break;
        case 'c': capacity = strtoul(optarg, NULL, 10); break;
        case 'r': record_size = strtoul(optarg, NULL, 10); break;
        case 'v':
            eq = strchr(optarg, '=');
            if (!eq || eq == optarg || eq - optarg > 24 || nvalues == 8)
                goto usage;
            memcpy(values[nvalues].name, optarg, (size_t)(eq - optarg));
            values[nvalues++].value = strtod(eq + 1, NULL);
            break;
        case 't':
            tree = !strcmp(optarg, "v2") ? OOMKIT_TREE_V2 : !strcmp(optarg, "system") ? OOMKIT_TREE_SYSTEM : OOMKIT_TREE_V1;
            break;
        default: goto usage;
        }
    }
    if (argc - optind != 4)
        goto usage;
    pid = (unsigned)strtoul(argv[optind + 2], NULL, 10);
    ticks = pid ? oomkit_start_ticks(pid) : 0;
    if (pid && !ticks) {
        fprintf(stderr, "producer: cannot read the start time of pid %u\n", pid);
        return 1;
    }
    err = oomkit_ring_create(&ring, argv[optind], argv[optind + 1], (uint32_t)capacity, (uint32_t)record_size);
    if (err < 0) {
        fprintf(stderr, "producer: creating ring %s in %s: %s\n", argv[optind + 1], argv[optind], strerror(-err));
        return 1;
    }
    for (unsigned long i = 0; i < count; i++) {
        seq = oomkit_publish_values(&ring, (enum oomkit_kind)kind, tree, pid, ticks, argv[optind + 3], values, nvalues);
        if (seq < 0) {
            fprintf(stderr, "producer: publish: %s\n", strerror((int)-seq));
            oomkit_ring_close(&ring, 0);
            return 1;
        }
    }
    printf("%lld\n", (long long)seq);
    oomkit_ring_close(&ring, 0);
    return 0;
usage:
    fprintf(stderr, "usage: %s [-n COUNT] [-k KIND] [-t v1|v2|system] [-c CAPACITY] [-r RECORD_SIZE]"
            " [-v NAME=VALUE ...] DIR NAME PID CGROUP\n", argv[0]);
    return 2;
}
