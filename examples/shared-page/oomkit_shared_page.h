/* oomkit shared page, layout version 1: a producer's side in C.
 *
 * Specification: docs/shared-page.md.  Little-endian, one writer per ring: each producer
 * creates a ring file of its own in the reader's directory and publishes records into it.
 *
 *     struct oomkit_ring ring;
 *     if (oomkit_ring_create(&ring, "/run/oomkit/shared-page", "myproducer", 256, 512) < 0) ...
 *     oomkit_publish(&ring, OOMKIT_KIND_OOM, OOMKIT_TREE_V1, pid, start_ticks, "/a/memcg");
 *     oomkit_ring_close(&ring, 1);
 *
 * Functions return 0 (or a sequence number) on success and -errno on failure.  Nothing here
 * allocates memory after oomkit_ring_create, so publishing works while the machine is out
 * of memory.  Needs Linux, GCC or Clang (__atomic builtins), and flock/MSG_NOSIGNAL: define
 * _GNU_SOURCE (or _DEFAULT_SOURCE) before including it.
 */
#ifndef OOMKIT_SHARED_PAGE_H
#define OOMKIT_SHARED_PAGE_H

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the shared page is little-endian; a big-endian producer must byte-swap every field"
#endif

#define OOMKIT_MAGIC "OOMKRING"
#define OOMKIT_VERSION 1
#define OOMKIT_HEADER_SIZE 64
#define OOMKIT_RECORD_HEADER_SIZE 40
#define OOMKIT_RECORD_SIZE_MIN 64
#define OOMKIT_RECORD_SIZE_MAX 8192
#define OOMKIT_CAPACITY_MAX 65536
#define OOMKIT_DOORBELL_NAME "doorbell"

enum oomkit_kind {
    OOMKIT_KIND_OOM = 1,
    OOMKIT_KIND_KERNEL_KILL = 2,
    OOMKIT_KIND_LOW_MEMORY = 3,
    OOMKIT_KIND_PRESSURE = 4,
    OOMKIT_KIND_PRESSURE_CLEARED = 5,
    OOMKIT_KIND_THRESHOLD = 6,
    OOMKIT_KIND_MEMORY_EVENTS = 7,
};

/* Record flags, bits 0-1: which tree the path is in.  Every other bit must be 0. */
enum oomkit_tree {
    OOMKIT_TREE_V1 = 0,     /* cgroup v1 memory controller */
    OOMKIT_TREE_V2 = 1,     /* cgroup v2 */
    OOMKIT_TREE_SYSTEM = 2, /* the whole machine; the path is "/" */
};

struct oomkit_header {
    char magic[8];          /* "OOMKRING" */
    uint16_t version;       /* 1 */
    uint16_t header_size;   /* 64 */
    uint32_t record_size;   /* multiple of 64 in [64, 8192] */
    uint32_t capacity;      /* records, in [1, 65536] */
    uint32_t flags;         /* incompatible features; none in version 1, so 0 */
    uint32_t producer_pid;  /* for the reader's logs only */
    uint32_t reserved0;
    uint64_t write_seq;     /* records committed; stored with release after each commit */
    uint8_t reserved1[24];
};

/* pid, start_ticks and mono_ns are as the *reader* sees them: its pid namespace, its time
 * namespace (CLOCK_MONOTONIC and /proc/PID/stat's start time are offset per time namespace),
 * and path as the reader's /proc/PID/cgroup shows it.  See docs/shared-page.md. */
struct oomkit_record {
    uint64_t seq;           /* 2n-1 while record n is written, 2n once it is committed */
    uint64_t mono_ns;       /* CLOCK_MONOTONIC when the event happened */
    uint64_t start_ticks;   /* field 22 of /proc/PID/stat; 0 exactly when pid is 0 */
    uint32_t pid;           /* the process that triggered the event (not a suggested victim), or 0 */
    uint16_t kind;          /* enum oomkit_kind */
    uint16_t flags;         /* enum oomkit_tree in bits 0-1 */
    uint16_t path_len;      /* bytes of path, no terminating NUL */
    uint16_t value_count;   /* struct oomkit_value entries after the path */
    uint8_t reserved[4];
    char path[];            /* path_len bytes, zeros to an 8-byte boundary, the values, zeros to the end */
};

/* One of the event's values: a name of [a-z][a-z0-9_]* (at most 24, NUL-padded) and a
 * finite number of magnitude at most 1e18. */
struct oomkit_value {
    char name[24];
    double value;
};

_Static_assert(sizeof(struct oomkit_header) == OOMKIT_HEADER_SIZE, "header is 64 bytes");
_Static_assert(offsetof(struct oomkit_header, write_seq) == 32, "write_seq at 32");
_Static_assert(offsetof(struct oomkit_record, path) == OOMKIT_RECORD_HEADER_SIZE, "path at 40");
_Static_assert(sizeof(struct oomkit_value) == 32, "a value is 32 bytes");

struct oomkit_ring {
    struct oomkit_header *hdr;
    size_t size;
    int fd;
    int sock;               /* for the doorbell; -1 if none */
    int connected;          /* sock is connected to the doorbell */
    struct sockaddr_un doorbell;
    socklen_t doorbell_len;
    char path[PATH_MAX];
};

static inline struct oomkit_record *oomkit_slot(const struct oomkit_ring *r, uint64_t n)
{
    return (struct oomkit_record *)((char *)r->hdr + OOMKIT_HEADER_SIZE +
                                    (size_t)((n - 1) % r->hdr->capacity) * r->hdr->record_size);
}

/* PID's start time, field 22 of /proc/PID/stat (what a record's start_ticks holds), or 0
 * when it cannot be read.  Reads into a stack buffer: allocates nothing. */
static inline uint64_t oomkit_start_ticks(unsigned pid)
{
    char path[64], buf[1024], *p;
    unsigned long long ticks = 0;
    ssize_t n;
    int fd, field;

    snprintf(path, sizeof(path), "/proc/%u/stat", pid);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    /* comm may hold spaces and parentheses: fields restart after the last ')'. */
    p = strrchr(buf, ')');
    for (field = 2; p && field < 22; field++)
        p = strchr(p + 1, ' ');
    if (p)
        sscanf(p + 1, "%llu", &ticks);
    return ticks;
}

/* Create DIR/NAME.ring (mode 0600), built at full size under a hidden name and renamed into
 * place so a reader never sees a half-written header or a short file, and hold an exclusive
 * flock on it: one writer.  A ring of that name that a live producer still holds is not
 * replaced (-EBUSY); its lock is held until the rename, so nobody takes it in between. */
static inline int oomkit_ring_create(struct oomkit_ring *r, const char *dir, const char *name,
                                     uint32_t capacity, uint32_t record_size)
{
    char tmp[PATH_MAX];
    int err, old;

    if (record_size < OOMKIT_RECORD_SIZE_MIN || record_size > OOMKIT_RECORD_SIZE_MAX ||
        record_size % 64 || capacity < 1 || capacity > OOMKIT_CAPACITY_MAX)
        return -EINVAL;
    memset(r, 0, sizeof(*r));
    r->fd = r->sock = -1;
    if (snprintf(r->path, sizeof(r->path), "%s/%s.ring", dir, name) >= (int)sizeof(r->path) ||
        snprintf(tmp, sizeof(tmp), "%s/.%s.ring.%d.tmp", dir, name, (int)getpid()) >= (int)sizeof(tmp))
        return -ENAMETOOLONG;
    r->size = OOMKIT_HEADER_SIZE + (size_t)capacity * record_size;
    old = open(r->path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
    if (old >= 0 && flock(old, LOCK_EX | LOCK_NB) < 0) {
        err = errno == EWOULDBLOCK ? -EBUSY : -errno;
        close(old);
        return err;
    }
    r->fd = open(tmp, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (r->fd < 0) {
        err = -errno;
        if (old >= 0)
            close(old);
        return err;
    }
    if (fchmod(r->fd, 0600) < 0 || ftruncate(r->fd, (off_t)r->size) < 0 ||
        flock(r->fd, LOCK_EX | LOCK_NB) < 0)
        goto fail;
    r->hdr = mmap(NULL, r->size, PROT_READ | PROT_WRITE, MAP_SHARED, r->fd, 0);
    if (r->hdr == MAP_FAILED) {
        r->hdr = NULL;
        goto fail;
    }
    memcpy(r->hdr->magic, OOMKIT_MAGIC, 8);
    r->hdr->version = OOMKIT_VERSION;
    r->hdr->header_size = OOMKIT_HEADER_SIZE;
    r->hdr->record_size = record_size;
    r->hdr->capacity = capacity;
    r->hdr->producer_pid = (uint32_t)getpid();
    if (rename(tmp, r->path) < 0)
        goto fail;
    if (old >= 0)
        close(old);

    /* The doorbell is optional: without it the reader's slow poll still finds every record. */
    r->doorbell.sun_family = AF_UNIX;
    if (snprintf(r->doorbell.sun_path, sizeof(r->doorbell.sun_path), "%s/" OOMKIT_DOORBELL_NAME, dir) <
        (int)sizeof(r->doorbell.sun_path)) {
        r->doorbell_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(r->doorbell.sun_path) + 1);
        r->sock = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    }
    return 0;
fail:
    err = -errno;
    if (old >= 0)
        close(old);
    if (r->hdr)
        munmap(r->hdr, r->size);
    close(r->fd);
    unlink(tmp);
    r->hdr = NULL;
    r->fd = -1;
    return err;
}

/* Wake the reader.  Never blocks and never raises SIGPIPE; a reader that is not running
 * (ENOENT, ECONNREFUSED) or busy (EAGAIN) is not an error for the producer.  The socket is
 * connected once and then only sends: a sendto() per ring made the kernel look the path up
 * each time, a third of the time from a record to the reader's wake.  A reader that
 * restarted has a new socket (the old one refuses: ECONNREFUSED), so a refused send
 * connects again once. */
static inline int oomkit_ring_doorbell(struct oomkit_ring *r)
{
    static const char ding = 0;
    int again;

    if (r->sock < 0)
        return -ENOTCONN;
    for (again = 0; again < 2; again++) {
        if (!r->connected) {
            if (connect(r->sock, (const struct sockaddr *)&r->doorbell, r->doorbell_len) < 0)
                return -errno;
            r->connected = 1;
        }
        if (send(r->sock, &ding, 1, MSG_DONTWAIT | MSG_NOSIGNAL) == 1)
            return 0;
        if (errno != ECONNREFUSED && errno != ENOTCONN)
            return -errno;
        r->connected = 0;
    }
    return -ECONNREFUSED;
}

/* Publish one record with values and ring the doorbell.  Returns the record's sequence
 * number (> 0) or -errno.  Seqlock order: the odd sequence word is visible before any byte
 * of the body, the body before the even word (release), the even word before write_seq
 * (release).  Names and values are checked by the reader: a bad one costs the record. */
static inline int64_t oomkit_publish_values(struct oomkit_ring *r, enum oomkit_kind kind, enum oomkit_tree tree,
                                            uint32_t pid, uint64_t start_ticks, const char *path,
                                            const struct oomkit_value *values, uint16_t value_count)
{
    struct oomkit_header *h = r->hdr;
    size_t len = strlen(path), at = (len + 7) / 8 * 8;
    struct timespec ts;
    struct oomkit_record *rec;
    uint64_t n;

    if (len > h->record_size - OOMKIT_RECORD_HEADER_SIZE)
        return -ENAMETOOLONG;
    if (value_count && OOMKIT_RECORD_HEADER_SIZE + at + (size_t)value_count * sizeof(struct oomkit_value) > h->record_size)
        return -E2BIG;
    if (path[0] != '/' || (pid == 0) != (start_ticks == 0) || (tree == OOMKIT_TREE_SYSTEM && len != 1))
        return -EINVAL;
    clock_gettime(CLOCK_MONOTONIC, &ts);

    n = __atomic_load_n(&h->write_seq, __ATOMIC_RELAXED) + 1; /* we are the only writer */
    rec = oomkit_slot(r, n);
    __atomic_store_n(&rec->seq, 2 * n - 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    rec->mono_ns = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    rec->start_ticks = start_ticks;
    rec->pid = pid;
    rec->kind = (uint16_t)kind;
    rec->flags = (uint16_t)tree;
    rec->path_len = (uint16_t)len;
    rec->value_count = value_count;
    memset(rec->reserved, 0, sizeof(rec->reserved));
    memset(rec->path, 0, h->record_size - OOMKIT_RECORD_HEADER_SIZE);
    memcpy(rec->path, path, len);
    if (value_count)
        memcpy(rec->path + at, values, (size_t)value_count * sizeof(struct oomkit_value));
    __atomic_store_n(&rec->seq, 2 * n, __ATOMIC_RELEASE);
    __atomic_store_n(&h->write_seq, n, __ATOMIC_RELEASE);
    oomkit_ring_doorbell(r);
    return (int64_t)n;
}

/* Publish one record without values. */
static inline int64_t oomkit_publish(struct oomkit_ring *r, enum oomkit_kind kind, enum oomkit_tree tree,
                                     uint32_t pid, uint64_t start_ticks, const char *path)
{
    return oomkit_publish_values(r, kind, tree, pid, start_ticks, path, NULL, 0);
}

/* Unmap and close; with unlink, also remove the ring file (the reader then drops it). */
static inline void oomkit_ring_close(struct oomkit_ring *r, int unlink_ring)
{
    if (unlink_ring)
        unlink(r->path);
    if (r->hdr)
        munmap(r->hdr, r->size);
    if (r->fd >= 0)
        close(r->fd);
    if (r->sock >= 0)
        close(r->sock);
    r->hdr = NULL;
    r->fd = r->sock = -1;
}

#endif /* OOMKIT_SHARED_PAGE_H */
