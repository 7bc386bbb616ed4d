/* The receive loop of the benchmark load generator, in C.
 *
 * benchmarks/_client.py opens the connections and does the handshakes in
 * Python, then hands each open socket to this loop, which does what its
 * Python loop does (benchmarks._client.Client.feed), a few times cheaper:
 * parse frame headers, skip payloads without copying them, answer pings,
 * and for message k of the current phase record the latest arrival time
 * over all connections. Message k is the one numbered first + k (the number
 * the benchmark servers put at the head of each message, see
 * benchmarks._servers.make_message); a frame without a readable number (a
 * compressed one, or one from another kind of server) is taken as the next
 * in order on its connection. The cheaper
 * the load generator, the more of the machine is left to the server under
 * test, so servers are compared on their own cost.
 *
 * Loaded with ctypes; _client.py builds it with the system C compiler and
 * falls back to its Python loop when there is none. Linux only (epoll).
 */

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define RECV_SIZE (256 * 1024)
#define MAX_EVENTS 1024
#define STDIN_TAG UINT64_MAX
/* A numbered message starts "<20-digit ns timestamp>:<8-digit number>:". */
#define HEAD_LEN 30

typedef struct {
    int fd;
    int open;
    int opcode;             /* of the frame being read; -1 between frames */
    uint64_t skip;          /* payload bytes of that frame still to come */
    unsigned char hdr[14];  /* a frame header split across reads */
    int hdr_len;
    unsigned char ctl[125]; /* payload of a control frame being read, or the
                               first HEAD_LEN bytes of a data frame's */
    int ctl_len;
    int compressed;         /* the frame being read has RSV1 set */
    int64_t count;          /* data frames received in this phase */
    int64_t got;            /* of them, messages of this phase */
} conn_t;

typedef struct {
    int epfd;
    conn_t *conns;
    int n, cap, open;
    int64_t expected;       /* messages in this phase; 0 between phases */
    int64_t base;           /* number of the phase's first message; -1: none */
    int64_t *last;          /* [expected]: latest arrival of each message */
    int64_t first, received, complete;
    unsigned char *buf;
} client_t;

static int64_t
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

client_t *
fc_new(int capacity, int stdin_fd)
{
    client_t *c = calloc(1, sizeof(client_t));
    if (c == NULL)
        return NULL;
    c->conns = calloc(capacity > 0 ? capacity : 1, sizeof(conn_t));
    c->buf = malloc(RECV_SIZE);
    c->epfd = epoll_create1(0);
    if (c->conns == NULL || c->buf == NULL || c->epfd < 0) {
        free(c->conns);
        free(c->buf);
        free(c);
        return NULL;
    }
    c->cap = capacity;
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = STDIN_TAG};
    epoll_ctl(c->epfd, EPOLL_CTL_ADD, stdin_fd, &ev);
    return c;
}

/* Take over an open connection, in the frame state Python left it in. */
int
fc_add(client_t *c, int fd, int opcode, uint64_t skip,
       const unsigned char *hdr, int hdr_len,
       const unsigned char *ctl, int ctl_len)
{
    if (c->n >= c->cap || hdr_len > 14 || ctl_len > 125)
        return -1;
    conn_t *conn = &c->conns[c->n];
    conn->fd = fd;
    conn->open = 1;
    conn->opcode = opcode;
    conn->skip = skip;
    memcpy(conn->hdr, hdr, hdr_len);
    conn->hdr_len = hdr_len;
    memcpy(conn->ctl, ctl, ctl_len);
    conn->ctl_len = ctl_len;
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)c->n};
    if (epoll_ctl(c->epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
        return -1;
    c->n++;
    c->open++;
    return 0;
}

/* Start a phase of `expected` messages; `last` has room for them. Messages
 * are numbered from `base` (-1: match them by order only). */
void
fc_start(client_t *c, int64_t expected, int64_t *last, int64_t base)
{
    for (int i = 0; i < c->n; i++)
        c->conns[i].count = c->conns[i].got = 0;
    c->expected = expected;
    c->base = base;
    c->last = last;
    if (expected > 0)
        memset(last, 0, sizeof(int64_t) * expected);
    c->first = c->received = c->complete = 0;
}

/* out[0..3] = received, complete, first arrival (ns), open connections */
void
fc_stats(client_t *c, int64_t *out)
{
    out[0] = c->received;
    out[1] = c->complete;
    out[2] = c->first;
    out[3] = c->open;
}

static void
close_conn(client_t *c, conn_t *conn)
{
    if (!conn->open)
        return;
    conn->open = 0;
    c->open--;
    epoll_ctl(c->epfd, EPOLL_CTL_DEL, conn->fd, NULL);
    close(conn->fd);
}

static void
send_pong(client_t *c, conn_t *conn)
{
    /* A client masks every frame; the key need not be secret here. */
    static const unsigned char key[4] = {0x37, 0xfa, 0x21, 0x3d};
    unsigned char frame[2 + 4 + 125];
    int n = conn->ctl_len;
    frame[0] = 0x8A;
    frame[1] = 0x80 | (unsigned char)n;
    memcpy(frame + 2, key, 4);
    for (int i = 0; i < n; i++)
        frame[6 + i] = conn->ctl[i] ^ key[i & 3];
    if (send(conn->fd, frame, 6 + n, MSG_DONTWAIT | MSG_NOSIGNAL) != 6 + n)
        close_conn(c, conn);
}

/* The number at the head of a benchmark message, or -1 if it has none. */
static int64_t
message_number(const unsigned char *head, int len)
{
    if (len < HEAD_LEN || head[20] != ':' || head[29] != ':')
        return -1;
    int64_t number = 0;
    for (int i = 0; i < 29; i++) {
        if (i == 20)
            continue;
        if (head[i] < '0' || head[i] > '9')
            return -1;
        if (i > 20)
            number = number * 10 + (head[i] - '0');
    }
    return number;
}

static void
frame_done(client_t *c, conn_t *conn, int64_t now)
{
    int opcode = conn->opcode;
    conn->opcode = -1;
    if (opcode >= 8) {
        if (opcode == 9)
            send_pong(c, conn);
        else if (opcode == 8)
            close_conn(c, conn);
        conn->ctl_len = 0;
        return;
    }
    int64_t number = c->base >= 0 && !conn->compressed
                         ? message_number(conn->ctl, conn->ctl_len) : -1;
    int64_t index = number >= 0 ? number - c->base : conn->count;
    conn->count++;
    conn->ctl_len = 0;
    if (index >= 0 && index < c->expected) {
        c->received++;
        if (now > c->last[index])
            c->last[index] = now;
        if (c->first == 0 || now < c->first)
            c->first = now;
        if (++conn->got == c->expected)
            c->complete++;
    }
}

/* Parse what arrived; the same steps as _client.Client.feed. */
static void
feed(client_t *c, conn_t *conn, const unsigned char *data, size_t n, int64_t now)
{
    size_t pos = 0;
    while (conn->open) {
        if (conn->opcode >= 0) {
            uint64_t take = conn->skip <= n - pos ? conn->skip : n - pos;
            if (take > 0 && (conn->opcode >= 8 || conn->ctl_len < HEAD_LEN)) {
                size_t room = (conn->opcode >= 8 ? sizeof(conn->ctl) : HEAD_LEN)
                              - conn->ctl_len;
                size_t copy = take < room ? take : room;
                memcpy(conn->ctl + conn->ctl_len, data + pos, copy);
                conn->ctl_len += (int)copy;
            }
            conn->skip -= take;
            pos += take;
            if (conn->skip)
                return;
            frame_done(c, conn, now);
            if (!conn->open)
                return;
        }
        if (pos >= n)
            return;
        /* A header is 2 to 10 bytes here (servers do not mask). */
        const unsigned char *h = data + pos;
        size_t avail = n - pos;
        unsigned char joined[14];
        if (conn->hdr_len) {
            size_t more = avail < 14 - (size_t)conn->hdr_len ? avail : 14 - (size_t)conn->hdr_len;
            memcpy(joined, conn->hdr, conn->hdr_len);
            memcpy(joined + conn->hdr_len, h, more);
            h = joined;
            avail = conn->hdr_len + more;
        }
        size_t need = 2;
        if (avail >= 2) {
            int len7 = h[1] & 0x7F;
            need = len7 == 126 ? 4 : len7 == 127 ? 10 : 2;
        }
        if (avail < need) {
            /* Keep the partial header for the next read. */
            if (!conn->hdr_len) {
                memcpy(conn->hdr, h, avail);
            } else {
                memcpy(conn->hdr, joined, avail);
            }
            conn->hdr_len = (int)avail;
            return;
        }
        uint64_t length = h[1] & 0x7F;
        if (length == 126) {
            length = ((uint64_t)h[2] << 8) | h[3];
        } else if (length == 127) {
            length = 0;
            for (int i = 2; i < 10; i++)
                length = (length << 8) | h[i];
        }
        /* Bytes of `data` the header used: all of it minus what we had. */
        pos += need - (size_t)conn->hdr_len;
        conn->hdr_len = 0;
        conn->opcode = h[0] & 0x0F;
        conn->compressed = (h[0] & 0x40) != 0;
        conn->skip = length;
        conn->ctl_len = 0;
        if (conn->opcode >= 8 && length > 125) {
            close_conn(c, conn); /* a control frame that long is a protocol error */
            return;
        }
        if (length == 0) {
            frame_done(c, conn, now);
        }
    }
}

/* Wait up to timeout_ms for events and handle them.
 * Returns 1 when stdin is readable (a command waits), 0 otherwise. */
int
fc_poll(client_t *c, int timeout_ms)
{
    struct epoll_event events[MAX_EVENTS];
    int ready = epoll_wait(c->epfd, events, MAX_EVENTS, timeout_ms);
    int command = 0;
    for (int i = 0; i < ready; i++) {
        if (events[i].data.u64 == STDIN_TAG) {
            command = 1;
            continue;
        }
        conn_t *conn = &c->conns[events[i].data.u64];
        if (!conn->open)
            continue;
        ssize_t got = recv(conn->fd, c->buf, RECV_SIZE, MSG_DONTWAIT);
        if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
            continue;
        if (got <= 0) {
            close_conn(c, conn);
            continue;
        }
        feed(c, conn, c->buf, (size_t)got, now_ns());
    }
    return command;
}

void
fc_close_all(client_t *c)
{
    for (int i = 0; i < c->n; i++)
        close_conn(c, &c->conns[i]);
}
