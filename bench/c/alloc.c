/* scenalloc: one process of an OOM scenario (bench/scenarios.py), doing what its options say.
 *
 *     scenalloc [--name COMM] [--adj N] [--hold MIB] [--grow MIB_PER_S] [--grow-delay S]
 *               [--grow-max MIB] [--spike MIB --period MS] [--memfd MIB [--sharers N]]
 *               [--fork N --fork-delay S --fork-interval MS --child-mib MIB]
 *               [--child-name COMM] [--cache FILE]
 *
 * --name/--adj set comm (prctl) and oom_score_adj first.  --hold touches that much private
 * anonymous memory at once.  --grow adds private anonymous memory at a steady rate (1 MiB
 * chunks), after --grow-delay, up to --grow-max (0: until killed).  --spike maps, touches
 * and unmaps a buffer every --period (mapped for the first half, freed for the second).
 * --memfd creates a memfd of that size, maps it shared and writes every page; with
 * --sharers N, N-1 forked children named --child-name map and read all of it too, so each
 * sharer shows it in its RSS (RssShmem) though killing one frees none of it.  --fork starts
 * N children --fork-interval apart after --fork-delay, each a fork + exec of scenalloc named
 * --child-name, touching --child-mib and then sleeping.  --cache reads FILE in a loop (page cache the memcg can
 * reclaim).  Prints "ready" once set up (hold, memfd, sharers), then runs until killed.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#define MIB (1L << 20)

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void touch(char *p, long bytes)
{
    long page = sysconf(_SC_PAGESIZE);
    for (long i = 0; i < bytes; i += page)
        p[i] = 1;
}

static char *anon(long bytes)
{
    char *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
    return p;
}

static void set_name(const char *name)
{
    if (name)
        prctl(PR_SET_NAME, name, 0, 0, 0);
}

static void set_adj(int adj)
{
    FILE *f = fopen("/proc/self/oom_score_adj", "w");
    if (!f || fprintf(f, "%d", adj) < 0 || fclose(f) != 0) {
        perror("oom_score_adj");
        exit(1);
    }
}

static void sleep_s(double s)
{
    if (s <= 0)
        return;
    struct timespec ts = {(time_t)s, (long)((s - (time_t)s) * 1e9)};
    nanosleep(&ts, NULL);
}

static void sleep_forever(void)
{
    for (;;)
        pause();
}

int main(int argc, char **argv)
{
    const char *name = NULL, *child_name = NULL, *cache = NULL;
    int adj = 0, have_adj = 0, sharers = 1, nfork = 0;
    long hold = 0, grow_max = 0, spike = 0, memfd_mib = 0, child_mib = 0;
    double grow = 0, grow_delay = 0, period_ms = 100, fork_delay = 0, fork_interval_ms = 50;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) {
            fprintf(stderr, "scenalloc: %s needs a value\n", a);
            return 2;
        }
        i++;
        if (!strcmp(a, "--name")) name = v;
        else if (!strcmp(a, "--adj")) adj = atoi(v), have_adj = 1;
        else if (!strcmp(a, "--hold")) hold = atol(v);
        else if (!strcmp(a, "--grow")) grow = atof(v);
        else if (!strcmp(a, "--grow-delay")) grow_delay = atof(v);
        else if (!strcmp(a, "--grow-max")) grow_max = atol(v);
        else if (!strcmp(a, "--spike")) spike = atol(v);
        else if (!strcmp(a, "--period")) period_ms = atof(v);
        else if (!strcmp(a, "--memfd")) memfd_mib = atol(v);
        else if (!strcmp(a, "--sharers")) sharers = atoi(v);
        else if (!strcmp(a, "--fork")) nfork = atoi(v);
        else if (!strcmp(a, "--fork-delay")) fork_delay = atof(v);
        else if (!strcmp(a, "--fork-interval")) fork_interval_ms = atof(v);
        else if (!strcmp(a, "--child-mib")) child_mib = atol(v);
        else if (!strcmp(a, "--child-name")) child_name = v;
        else if (!strcmp(a, "--cache")) cache = v;
        else {
            fprintf(stderr, "scenalloc: unknown option %s\n", a);
            return 2;
        }
    }
    set_name(name);
    if (have_adj)
        set_adj(adj);
    signal(SIGCHLD, SIG_IGN); /* forked children are reaped by the kernel */
    if (hold)
        touch(anon(hold * MIB), hold * MIB);
    if (memfd_mib) {
        int fd = memfd_create("scenario-shared", MFD_CLOEXEC);
        if (fd < 0 || ftruncate(fd, memfd_mib * MIB) != 0) {
            perror("memfd");
            return 1;
        }
        char *p = mmap(NULL, memfd_mib * MIB, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED) {
            perror("mmap memfd");
            return 1;
        }
        touch(p, memfd_mib * MIB);
        for (int s = 1; s < sharers; s++) {
            if (fork() == 0) {
                set_name(child_name);
                volatile char sum = 0;
                for (long i = 0; i < memfd_mib * MIB; i += sysconf(_SC_PAGESIZE))
                    sum += p[i];
                sleep_forever();
            }
        }
    }
    printf("ready\n");
    fflush(stdout);

    double t0 = now_s();
    long grown = 0;
    int forked = 0;
    char *spike_buf = NULL;
    double next_spike = t0;
    char *cache_buf = cache ? malloc(MIB) : NULL;
    int cache_fd = cache ? open(cache, O_RDONLY) : -1;
    if (cache && cache_fd < 0) {
        perror(cache);
        return 1;
    }
    for (;;) {
        double t = now_s() - t0;
        if (grow > 0 && t >= grow_delay && (grow_max == 0 || grown < grow_max)) {
            long want = (long)((t - grow_delay) * grow);
            while (grown < want && (grow_max == 0 || grown < grow_max)) {
                touch(anon(MIB), MIB);
                grown++;
            }
        }
        if (nfork && forked < nfork && t >= fork_delay + forked * fork_interval_ms / 1000.0) {
            if (fork() == 0) {
                /* fork + exec, as a job runner or a shell does: the child shares none of the
                 * parent's memory (a forked-only child would map the parent's pages too). */
                char mib[32];
                snprintf(mib, sizeof mib, "%ld", child_mib);
                int devnull = open("/dev/null", O_WRONLY);
                dup2(devnull, 1);
                execl("/proc/self/exe", "scenalloc", "--name", child_name ? child_name : "child",
                      "--hold", mib, (char *)NULL);
                _exit(127);
            }
            forked++;
        }
        if (spike && now_s() >= next_spike) {
            if (spike_buf) {
                munmap(spike_buf, spike * MIB);
                spike_buf = NULL;
            } else {
                spike_buf = anon(spike * MIB);
                touch(spike_buf, spike * MIB);
            }
            next_spike += period_ms / 2000.0;
        }
        if (cache_fd >= 0) {
            if (read(cache_fd, cache_buf, MIB) <= 0)
                lseek(cache_fd, 0, SEEK_SET);
            continue;
        }
        sleep_s(0.005);
    }
}
