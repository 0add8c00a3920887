/* memsampler: an independent /proc/meminfo sampler for the threshold benchmark.
 *
 *     memsampler INTERVAL_US
 *
 * Reads MemAvailable every INTERVAL_US until SIGTERM, keeping the samples in memory, and
 * then prints them as "MONOTONIC_NS MEMAVAILABLE_KIB" lines: nothing is written while it
 * samples, so the sampler adds no I/O to the run it watches.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_SAMPLES (1 << 20)

static volatile sig_atomic_t stop;
static uint64_t t[MAX_SAMPLES], kib[MAX_SAMPLES];

static void on_term(int sig)
{
    (void)sig;
    stop = 1;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int main(int argc, char **argv)
{
    long interval_us = argc > 1 ? atol(argv[1]) : 1000;
    struct sigaction sa = {.sa_handler = on_term};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    int fd = open("/proc/meminfo", O_RDONLY);
    if (fd < 0) {
        perror("/proc/meminfo");
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    size_t n = 0;
    char buf[8192];
    struct timespec gap = {interval_us / 1000000, (interval_us % 1000000) * 1000};
    while (!stop && n < MAX_SAMPLES) {
        ssize_t len = pread(fd, buf, sizeof buf - 1, 0);
        uint64_t when = now_ns();
        if (len <= 0)
            break;
        buf[len] = 0;
        char *p = strstr(buf, "MemAvailable:");
        if (p) {
            t[n] = when;
            kib[n++] = strtoull(p + 13, NULL, 10);
        }
        nanosleep(&gap, NULL);
    }
    for (size_t i = 0; i < n; i++)
        printf("%llu %llu\n", (unsigned long long)t[i], (unsigned long long)kib[i]);
    return 0;
}
