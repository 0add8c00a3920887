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

struct oomkit_record {
    uint64_t seq;           /* 2n-1 while record n is written, 2n once it is committed */
    uint64_t mono_ns;       /* CLOCK_MONOTONIC when the event happened */
    uint64_t start_ticks;   /* field 22 of /proc/PID/stat; 0 exactly when pid is 0 */
    uint32_t pid;           /* the process that triggered the event, or 0 */
    uint16_t kind;          /* enum oomkit_kind */
    uint16_t flags;         /* enum oomkit_tree in bits 0-1 */
    uint16_t path_len;      /* bytes of path, no terminating NUL */
    uint8_t reserved[6];
    char path[];            /* up to record_size - 40 bytes; the rest of the record is 0 */
};

_Static_assert(sizeof(struct oomkit_header) == OOMKIT_HEADER_SIZE, "header is 64 bytes");
_Static_assert(offsetof(struct oomkit_header, write_seq) == 32, "write_seq at 32");
_Static_assert(offsetof(struct oomkit_record, path) == OOMKIT_RECORD_HEADER_SIZE, "path at 40");

struct oomkit_ring {
    struct oomkit_header *hdr;
    size_t size;
    int fd;
    int sock;               /* for the doorbell; -1 if none */
    struct sockaddr_un doorbell;
    socklen_t doorbell_len;
    char path[PATH_MAX];
};

static inline struct oomkit_record *oomkit_slot(const struct oomkit_ring *r, uint64_t n)
{
    return (struct oomkit_record *)((char *)r->hdr + OOMKIT_HEADER_SIZE +
                                    (size_t)((n - 1) % r->hdr->capacity) * r->hdr->record_size);
}

/* Create DIR/NAME.ring (mode 0600), built under a hidden name and renamed into place so a
 * reader never maps a half-written header, and hold an exclusive flock on it: one writer. */
static inline int oomkit_ring_create(struct oomkit_ring *r, const char *dir, const char *name,
                                     uint32_t capacity, uint32_t record_size)
{
    char tmp[PATH_MAX];
    int err;

    if (record_size < OOMKIT_RECORD_SIZE_MIN || record_size > OOMKIT_RECORD_SIZE_MAX ||
        record_size % 64 || capacity < 1 || capacity > OOMKIT_CAPACITY_MAX)
        return -EINVAL;
    memset(r, 0, sizeof(*r));
    r->fd = r->sock = -1;
    if (snprintf(r->path, sizeof(r->path), "%s/%s.ring", dir, name) >= (int)sizeof(r->path) ||
        snprintf(tmp, sizeof(tmp), "%s/.%s.ring.%d.tmp", dir, name, (int)getpid()) >= (int)sizeof(tmp))
        return -ENAMETOOLONG;
    r->size = OOMKIT_HEADER_SIZE + (size_t)capacity * record_size;
    r->fd = open(tmp, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (r->fd < 0)
        return -errno;
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
    if (r->hdr)
        munmap(r->hdr, r->size);
    close(r->fd);
    unlink(tmp);
    r->hdr = NULL;
    r->fd = -1;
    return err;
}

/* Wake the reader.  Never blocks and never raises SIGPIPE; a reader that is not running
 * (ENOENT, ECONNREFUSED) or busy (EAGAIN) is not an error for the producer. */
static inline int oomkit_ring_doorbell(const struct oomkit_ring *r)
{
    static const char ding = 0;
    if (r->sock < 0)
        return -ENOTCONN;
    if (sendto(r->sock, &ding, 1, MSG_DONTWAIT | MSG_NOSIGNAL, (const struct sockaddr *)&r->doorbell,
               r->doorbell_len) < 0)
        return -errno;
    return 0;
}

/* Publish one record and ring the doorbell.  Returns the record's sequence number (> 0) or
 * -errno.  Seqlock order: the odd sequence word is visible before any byte of the body, the
 * body before the even word (release), the even word before write_seq (release). */
static inline int64_t oomkit_publish(struct oomkit_ring *r, enum oomkit_kind kind, enum oomkit_tree tree,
                                     uint32_t pid, uint64_t start_ticks, const char *path)
{
    struct oomkit_header *h = r->hdr;
    size_t len = strlen(path);
    struct timespec ts;
    struct oomkit_record *rec;
    uint64_t n;

    if (len > h->record_size - OOMKIT_RECORD_HEADER_SIZE)
        return -ENAMETOOLONG;
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
    memset(rec->reserved, 0, sizeof(rec->reserved));
    memcpy(rec->path, path, len);
    memset(rec->path + len, 0, h->record_size - OOMKIT_RECORD_HEADER_SIZE - len);
    __atomic_store_n(&rec->seq, 2 * n, __ATOMIC_RELEASE);
    __atomic_store_n(&h->write_seq, n, __ATOMIC_RELEASE);
    oomkit_ring_doorbell(r);
    return (int64_t)n;
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
