/* floor: the minimal user-space memcg OOM handler, the floor oomkit is measured against.
 *
 *     floor MEMCG_DIR
 *
 * Takes over the memcg (oom_kill_disable=1), registers an eventfd on memory.oom_control,
 * prints "ready", then for every wake: read cgroup.procs, SIGKILL every pid, and print
 * "WAKE_NS SENT_NS NPIDS" (CLOCK_MONOTONIC).  No ranking, no vetoes, no logging before the
 * kill: nothing a real handler could skip.  SIGTERM hands the memcg back to the kernel.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

static char control[4096];

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int write_file(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY);
    if (fd < 0)
        return -1;
    ssize_t n = write(fd, text, strlen(text));
    close(fd);
    return n < 0 ? -1 : 0;
}

static void hand_back(int sig)
{
    (void)sig;
    write_file(control, "0");
    _exit(0);
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: floor MEMCG_DIR\n");
        return 2;
    }
    char procs[4096], events[4096], line[64];
    snprintf(control, sizeof control, "%s/memory.oom_control", argv[1]);
    snprintf(procs, sizeof procs, "%s/cgroup.procs", argv[1]);
    snprintf(events, sizeof events, "%s/cgroup.event_control", argv[1]);
    int efd = eventfd(0, EFD_CLOEXEC);
    int cfd = open(control, O_RDONLY | O_CLOEXEC);
    if (efd < 0 || cfd < 0) {
        perror(control);
        return 1;
    }
    snprintf(line, sizeof line, "%d %d", efd, cfd);
    signal(SIGTERM, hand_back);
    signal(SIGINT, hand_back);
    if (write_file(events, line) < 0 || write_file(control, "1") < 0) {
        perror(events);
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        uint64_t count;
        if (read(efd, &count, sizeof count) != sizeof count)
            break;
        uint64_t wake = now_ns();
        char buf[65536];
        int fd = open(procs, O_RDONLY);
        ssize_t n = fd < 0 ? -1 : read(fd, buf, sizeof buf - 1);
        if (fd >= 0)
            close(fd);
        int killed = 0;
        if (n > 0) {
            buf[n] = 0;
            for (char *p = buf, *end; *p; p = end) {
                long pid = strtol(p, &end, 10);
                if (end == p)
                    break;
                if (kill((pid_t)pid, SIGKILL) == 0)
                    killed++;
            }
        }
        uint64_t sent = now_ns();
        printf("%llu %llu %d\n", (unsigned long long)wake, (unsigned long long)sent, killed);
        fflush(stdout);
    }
    hand_back(0);
    return 0;
}
