/* The experiment behind "below the floor" (benchmarks/uring_floor.py): one
 * broadcast's sends, as a plain send() loop or submitted in batches through
 * io_uring (raw system calls, no liburing), over the same descriptors.
 *
 * Built by the benchmark with the system's C compiler and loaded with
 * ctypes; not part of stargate. Every function fills results[i] with what
 * send() (or the completion) returned for fds[i], a negative errno on
 * error, and returns how many took all of the buffer (or -errno).
 */

#define _GNU_SOURCE
#include <errno.h>
#include <linux/io_uring.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#define SEND_FLAGS (MSG_DONTWAIT | MSG_NOSIGNAL)

long
loop_send(const int *fds, int n, const void *buf, size_t len, int *results)
{
    long full = 0;
    for (int i = 0; i < n; i++) {
        ssize_t sent;
        do {
            sent = send(fds[i], buf, len, SEND_FLAGS);
        } while (sent < 0 && errno == EINTR);
        results[i] = sent < 0 ? -errno : (int)sent;
        full += (size_t)sent == len;
    }
    return full;
}

struct ring {
    int fd;
    unsigned entries;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    void *sq_ptr, *cq_ptr;
    size_t sq_len, cq_len, sqes_len;
};

static int
uring_setup(unsigned entries, struct io_uring_params *p)
{
    return (int)syscall(__NR_io_uring_setup, entries, p);
}

static int
uring_enter(int fd, unsigned submit, unsigned wait, unsigned flags)
{
    return (int)syscall(__NR_io_uring_enter, fd, submit, wait, flags, NULL, 0);
}

void
ur_free(struct ring *r)
{
    if (r == NULL) {
        return;
    }
    if (r->sqes != NULL && r->sqes != MAP_FAILED) {
        munmap(r->sqes, r->sqes_len);
    }
    if (r->cq_ptr != NULL && r->cq_ptr != MAP_FAILED && r->cq_ptr != r->sq_ptr) {
        munmap(r->cq_ptr, r->cq_len);
    }
    if (r->sq_ptr != NULL && r->sq_ptr != MAP_FAILED) {
        munmap(r->sq_ptr, r->sq_len);
    }
    if (r->fd >= 0) {
        close(r->fd);
    }
    free(r);
}

/* A ring of `entries` submissions, or NULL with *error = errno (ENOSYS:
 * no io_uring; EPERM: refused by io_uring_disabled or seccomp). */
struct ring *
ur_new(unsigned entries, unsigned flags, int *error)
{
    struct io_uring_params p;
    struct ring *r = calloc(1, sizeof(*r));
    if (r == NULL) {
        *error = ENOMEM;
        return NULL;
    }
    memset(&p, 0, sizeof(p));
    p.flags = flags;
    r->fd = uring_setup(entries, &p);
    if (r->fd < 0) {
        *error = errno;
        free(r);
        return NULL;
    }
    r->entries = p.sq_entries;
    r->sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    r->cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        if (r->cq_len > r->sq_len) {
            r->sq_len = r->cq_len;
        }
        r->cq_len = r->sq_len;
    }
    r->sq_ptr = mmap(NULL, r->sq_len, PROT_READ | PROT_WRITE,
                     MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_SQ_RING);
    if (r->sq_ptr == MAP_FAILED) {
        goto fail;
    }
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        r->cq_ptr = r->sq_ptr;
    }
    else {
        r->cq_ptr = mmap(NULL, r->cq_len, PROT_READ | PROT_WRITE,
                         MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_CQ_RING);
        if (r->cq_ptr == MAP_FAILED) {
            goto fail;
        }
    }
    r->sqes_len = p.sq_entries * sizeof(struct io_uring_sqe);
    r->sqes = mmap(NULL, r->sqes_len, PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_SQES);
    if (r->sqes == MAP_FAILED) {
        goto fail;
    }
    char *sq = r->sq_ptr, *cq = r->cq_ptr;
    r->sq_head = (unsigned *)(sq + p.sq_off.head);
    r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)(sq + p.sq_off.array);
    r->cq_head = (unsigned *)(cq + p.cq_off.head);
    r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    return r;

fail:
    *error = errno;
    ur_free(r);
    return NULL;
}

/* Register fds[0..n) as the ring's fixed files (index i is fds[i]). */
int
ur_register_files(struct ring *r, const int *fds, int n)
{
    int ret = (int)syscall(__NR_io_uring_register, r->fd, IORING_REGISTER_FILES,
                           fds, (unsigned)n);
    return ret < 0 ? -errno : 0;
}

int
ur_unregister_files(struct ring *r)
{
    int ret = (int)syscall(__NR_io_uring_register, r->fd, IORING_UNREGISTER_FILES,
                           NULL, 0);
    return ret < 0 ? -errno : 0;
}

/* One IORING_OP_SEND per descriptor (per fixed file index when `fixed`),
 * submitted `entries` at a time with one io_uring_enter each, which also
 * waits for their completions (non-blocking sends complete inline). */
long
ur_send(struct ring *r, const int *fds, int n, const void *buf, size_t len,
        int fixed, int *results)
{
    long full = 0;
    int done = 0;
    unsigned mask = *r->sq_mask;
    while (done < n) {
        unsigned batch = (unsigned)(n - done);
        if (batch > r->entries) {
            batch = r->entries;
        }
        unsigned tail = *r->sq_tail;
        for (unsigned k = 0; k < batch; k++) {
            unsigned index = (tail + k) & mask;
            struct io_uring_sqe *sqe = &r->sqes[index];
            memset(sqe, 0, sizeof(*sqe));
            sqe->opcode = IORING_OP_SEND;
            sqe->fd = fixed ? done + (int)k : fds[done + k];
            sqe->flags = fixed ? IOSQE_FIXED_FILE : 0;
            sqe->addr = (uint64_t)(uintptr_t)buf;
            sqe->len = (uint32_t)len;
            sqe->msg_flags = SEND_FLAGS;
            sqe->user_data = (uint64_t)(done + k);
            r->sq_array[index] = index;
        }
        __atomic_store_n(r->sq_tail, tail + batch, __ATOMIC_RELEASE);
        unsigned submit = batch, reaped = 0;
        while (reaped < batch) {
            int ret = uring_enter(r->fd, submit, batch - reaped,
                                  IORING_ENTER_GETEVENTS);
            if (ret < 0) {
                if (errno == EINTR) {
                    continue;
                }
                return -errno;
            }
            submit -= (unsigned)ret < submit ? (unsigned)ret : submit;
            unsigned head = *r->cq_head;
            unsigned ctail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
            while (head != ctail) {
                struct io_uring_cqe *cqe = &r->cqes[head & *r->cq_mask];
                results[cqe->user_data] = cqe->res;
                full += cqe->res >= 0 && (size_t)cqe->res == len;
                head++;
                reaped++;
            }
            __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
        }
        done += (int)batch;
    }
    return full;
}
