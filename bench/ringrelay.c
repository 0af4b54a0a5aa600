/* ringrelay: ivnet's architecture with nothing else in it, a baseline for bench/table.sh.
 *
 * Two processes (or, with --threads, two threads of one process), one TAP each, joined by two
 * single-producer single-consumer byte rings in one shared mapping: the shape of two ivnet agents
 * on a segment, without what an agent adds (peer table, switch, checks of what it reads, checksum
 * completion, counters, heartbeats). Each side reads frames from its TAP straight into its
 * outgoing ring (the kernel's copy and nothing else; with --copy, into a private buffer first and
 * then memcpy into the ring, as an ivnet agent with offloads does) and writes frames from its
 * incoming ring straight to its TAP. Both TAPs use IFF_VNET_HDR (12-byte header) and
 * TUNSETOFFLOAD csum/TSO4/TSO6/TSO_ECN, as `taprelay --vnet` and an ivnet agent do; the header
 * and its partial checksum cross the ring untouched.
 *
 * A side with nothing to do sleeps in poll() on its TAP and its eventfd, after saying so in the
 * shared mapping; the other side writes that eventfd only when it published frames for a
 * sleeper, or freed room that a sleeper waits for (the rule ivnet's doorbells follow: do not
 * wake a consumer that is busy). With --spin US a side first spins that long.
 *
 * So: taprelay --vnet over this relay is the price of splitting a relay in two with a ring in
 * between, on this machine; this relay over an ivnet row is the price of what ivnet does beyond.
 *
 * The TAPs are created in the caller's network namespace; move them with `ip link set NAME netns
 * NS`. Runs until killed (a forked side exits when the other dies). Build:
 * gcc -O2 -pthread -o ringrelay ringrelay.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <immintrin.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#define VNET_HDR_LEN 12
/* Largest read: a 64 KiB TSO super-frame plus Ethernet and virtio headers, or a 65521-byte MTU
 * frame plus its Ethernet header. */
#define FRAME_MAX (65536 + 14 + VNET_HDR_LEN + 64)
#define REC_HDR 64 /* record header (its length), one cache line so frames start aligned */
#define REC_MAX (REC_HDR + FRAME_MAX)
#define WRAP UINT32_MAX /* record length meaning "continue at the start of the ring" */
#define BATCH 64

static const char *prog = "ringrelay";

struct ring {
    _Alignas(64) _Atomic uint64_t head; /* bytes published; written by the producer */
    _Alignas(64) _Atomic uint64_t tail; /* bytes consumed; written by the consumer */
};

/* What a side is waiting for, written by that side only. */
enum { AWAKE = 0, ASLEEP = 1, ASLEEP_FOR_ROOM = 2 };

struct side_state {
    _Alignas(64) _Atomic int sleeping;
};

struct shared {
    struct ring ring[2];      /* ring[i]: side i produces, side 1-i consumes */
    struct side_state side[2];
};

struct side {
    int id, tap, efd, peer_efd;
    const char *name;
    struct shared *sh;
    unsigned char *out, *in; /* data areas of the outgoing and incoming ring */
};

static size_t ring_bytes = 1 << 20;
static int copy_mode = 0, use_threads = 0, sum_mode = 0, nt_mode = 0, early_room = 0;
static long spin_ns = 0;

static void usage(void) {
    fprintf(stderr,
            "usage: %s [--copy] [--sum] [--nt] [--threads] [--early-room] [--spin US] [--ring KIB]\n"
            "       TAP_A TAP_B\n"
            "  Creates TAP_A and TAP_B (IFF_VNET_HDR, TSO) and relays frames between them through\n"
            "  two shared-memory rings, one side per TAP, until killed.\n"
            "  --copy     read each frame into a private buffer, then memcpy it into the ring\n"
            "  --sum      (implies --copy) complete a partial TCP/UDP checksum while copying and\n"
            "             clear NEEDS_CSUM, so the receiving kernel verifies it (ivnet's rule)\n"
            "  --nt       (implies --copy) copy into the ring with streaming stores (AVX2)\n"
            "  --threads  run the two sides as threads of one process (default: two processes)\n"
            "  --early-room  return ring room each quarter of the ring consumed, not only at the\n"
            "             end of a batch (as ivnet does)\n"
            "  --spin US  spin this long before sleeping (default 0)\n"
            "  --ring KIB bytes per ring (default 1024 KiB; at least %d KiB)\n",
            prog, 2 * REC_MAX / 1024 + 1);
    exit(2);
}

static void die(const char *what) {
    fprintf(stderr, "%s: %s: %s\n", prog, what, strerror(errno));
    exit(1);
}

static int tap_create(const char *name) {
    if (strlen(name) >= IFNAMSIZ) {
        fprintf(stderr, "%s: interface name '%s' is longer than %d characters\n", prog, name,
                IFNAMSIZ - 1);
        exit(1);
    }
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        die("open /dev/net/tun (needs root and the tun module)");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    memcpy(ifr.ifr_name, name, strlen(name));
    if (ioctl(fd, TUNSETIFF, &ifr) < 0)
        die("creating a TAP (TUNSETIFF)");
    int sz = VNET_HDR_LEN;
    if (ioctl(fd, TUNSETVNETHDRSZ, &sz) < 0)
        die("TUNSETVNETHDRSZ");
    if (ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN) < 0)
        die("TUNSETOFFLOAD csum|tso4|tso6|tso_ecn");
    return fd;
}

/* Copies n bytes from src to the 64-byte aligned dst, with streaming stores if `nt`, and returns
 * the 16-bit one's complement sum of src (unfolded; 16-bit words in memory order). */
__attribute__((target("avx2"))) static uint64_t copy_sum(unsigned char *dst,
                                                         const unsigned char *src, size_t n,
                                                         int nt) {
    const __m256i low = _mm256_set1_epi32(0xffff);
    __m256i acc = _mm256_setzero_si256();
    size_t i = 0;
    /* 32-bit lanes: each block adds at most 2 x 0xffff, so 32768 blocks (1 MiB) cannot overflow. */
    for (; i + 32 <= n; i += 32) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(src + i));
        if (nt)
            _mm256_stream_si256((__m256i *)(dst + i), v);
        else
            _mm256_storeu_si256((__m256i *)(dst + i), v);
        acc = _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_and_si256(v, low),
                                                     _mm256_srli_epi32(v, 16)));
    }
    if (nt)
        _mm_sfence();
    uint32_t lanes[8];
    _mm256_storeu_si256((__m256i *)lanes, acc);
    uint64_t sum = 0;
    for (int k = 0; k < 8; k++)
        sum += lanes[k];
    memcpy(dst + i, src + i, n - i);
    for (; i + 1 < n; i += 2)
        sum += (uint32_t)src[i] | (uint32_t)src[i + 1] << 8;
    if (i < n)
        sum += src[i];
    return sum;
}

static uint16_t fold(uint64_t s) {
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return (uint16_t)s;
}

/* Copies the frame (vnet header first) into the ring; with --sum completes its partial checksum
 * on the way (the sum of the bytes from csum_start, whose checksum field already holds the
 * pseudo-header's sum) and clears NEEDS_CSUM, in the private copy and in the ring. */
static void copy_in(unsigned char *dst, unsigned char *buf, size_t n) {
    if (!sum_mode && !nt_mode) {
        memcpy(dst, buf, n);
        return;
    }
    uint16_t start, off;
    memcpy(&start, buf + 6, 2);
    memcpy(&off, buf + 8, 2);
    size_t at = VNET_HDR_LEN + start, field = at + off;
    /* (csum_start is even for every IP header; an odd one is left to the receiver.) */
    int sum = sum_mode && (buf[0] & 1) && field + 2 <= n && at % 2 == 0;
    if (!sum) {
        copy_sum(dst, buf, n, nt_mode);
        return;
    }
    /* Header and the bytes before csum_start plainly, the rest summed as it is copied; the
     * field is then written in both copies. */
    buf[0] &= (unsigned char)~1;
    size_t head = at & ~(size_t)63;
    memcpy(dst, buf, head);
    uint64_t s = copy_sum(dst + head, buf + head, n - head, nt_mode);
    /* Take out the words before csum_start that the loop summed (both even offsets). */
    for (size_t k = head; k + 1 < at; k += 2)
        s += 0xffff - ((uint32_t)buf[k] | (uint32_t)buf[k + 1] << 8);
    uint16_t c = (uint16_t)~fold(s);
    if (c == 0 && off == 6) /* UDP sends a zero checksum as 0xffff */
        c = 0xffff;
    memcpy(buf + field, &c, 2);
    memcpy(dst + field, &c, 2);
    dst[0] = buf[0];
}

static uint64_t rec_len(uint32_t n) { return (REC_HDR + (uint64_t)n + 63) & ~(uint64_t)63; }

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

/* Rings the other side if it sleeps and `for_room` says what we did is what it waits for. The
 * fence pairs with the one in sleep(): either it sees our index store, or we see its flag. */
static void wake_peer(struct side *s, int for_room) {
    atomic_thread_fence(memory_order_seq_cst);
    int st = atomic_load_explicit(&s->sh->side[1 - s->id].sleeping, memory_order_relaxed);
    if (st == ASLEEP_FOR_ROOM || (st == ASLEEP && !for_room)) {
        uint64_t one = 1;
        if (write(s->peer_efd, &one, sizeof one) < 0 && errno != EAGAIN)
            die("writing the other side's eventfd");
    }
}

/* Where the next frame goes in the outgoing ring (after a wrap record if the end is too near),
 * or NULL when the ring lacks room for the largest frame. */
static unsigned char *reserve(struct side *s, uint64_t *head) {
    struct ring *r = &s->sh->ring[s->id];
    uint64_t tail = atomic_load_explicit(&r->tail, memory_order_acquire);
    uint64_t pos = *head % ring_bytes, to_end = ring_bytes - pos;
    uint64_t need = REC_MAX + (to_end < REC_MAX ? to_end : 0);
    if (ring_bytes - (*head - tail) < need)
        return NULL;
    if (to_end < REC_MAX) {
        *(uint32_t *)(s->out + pos) = WRAP;
        *head += to_end;
        pos = 0;
    }
    return s->out + pos;
}

/* TAP -> outgoing ring, at most one batch. Returns frames moved; sets *blocked if the ring is
 * full and *readable to 0 once the TAP is empty. */
static int tx(struct side *s, unsigned char *buf, int *blocked, int *readable) {
    struct ring *r = &s->sh->ring[s->id];
    uint64_t head = atomic_load_explicit(&r->head, memory_order_relaxed);
    int moved = 0;
    while (moved < BATCH && *readable) {
        uint64_t h = head;
        unsigned char *rec = reserve(s, &h);
        if (!rec) {
            *blocked = 1;
            break;
        }
        ssize_t n = read(s->tap, copy_mode ? buf : rec + REC_HDR, FRAME_MAX);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN)
                die("reading a TAP");
            *readable = 0;
            break;
        }
        if (copy_mode)
            copy_in(rec + REC_HDR, buf, (size_t)n);
        *(uint32_t *)rec = (uint32_t)n;
        head = h + rec_len((uint32_t)n);
        /* Release: the frame's bytes before the index that publishes them. */
        atomic_store_explicit(&r->head, head, memory_order_release);
        moved++;
    }
    if (moved)
        wake_peer(s, 0);
    return moved;
}

/* Incoming ring -> TAP, at most one batch. Returns frames moved. */
static int rx(struct side *s, unsigned long long *dropped) {
    struct ring *r = &s->sh->ring[1 - s->id];
    uint64_t tail = atomic_load_explicit(&r->tail, memory_order_relaxed);
    /* Acquire: the frames' bytes are visible once their index is. */
    uint64_t head = atomic_load_explicit(&r->head, memory_order_acquire);
    int moved = 0;
    while (tail != head && moved < BATCH) {
        uint64_t pos = tail % ring_bytes;
        uint32_t n = *(uint32_t *)(s->in + pos);
        if (n == WRAP) {
            tail += ring_bytes - pos;
            continue;
        }
        /* A full TAP queue or a peer that is down drops the frame, as a NIC would. */
        if (write(s->tap, s->in + pos + REC_HDR, n) != (ssize_t)n) {
            ++*dropped;
            if ((*dropped & (*dropped - 1)) == 0)
                fprintf(stderr, "%s: %s: %llu frames dropped so far (last: %s)\n", prog, s->name,
                        *dropped, strerror(errno));
        }
        tail += rec_len(n);
        moved++;
        if (early_room && tail - atomic_load_explicit(&r->tail, memory_order_relaxed) >=
                              ring_bytes / 4) {
            atomic_store_explicit(&r->tail, tail, memory_order_release);
            wake_peer(s, 1);
        }
    }
    if (moved) {
        /* Release: we are done reading the bytes before the producer may reuse them. */
        atomic_store_explicit(&r->tail, tail, memory_order_release);
        wake_peer(s, 1);
    }
    return moved;
}

static int incoming(struct side *s) {
    struct ring *r = &s->sh->ring[1 - s->id];
    return atomic_load_explicit(&r->head, memory_order_acquire) !=
           atomic_load_explicit(&r->tail, memory_order_relaxed);
}

static int room(struct side *s) {
    uint64_t h = atomic_load_explicit(&s->sh->ring[s->id].head, memory_order_relaxed);
    return reserve(s, &h) != NULL;
}

static void *run(void *arg) {
    struct side *s = arg;
    unsigned char *buf = malloc(FRAME_MAX);
    if (!buf)
        die("malloc");
    int blocked = 0, readable = 1;
    unsigned long long dropped = 0;
    _Atomic int *me = &s->sh->side[s->id].sleeping;
    for (;;) {
        if (blocked && room(s))
            blocked = 0;
        int did = blocked ? 0 : tx(s, buf, &blocked, &readable);
        did += rx(s, &dropped);
        if (did) {
            readable = 1; /* try the TAP again next round rather than ask poll() */
            continue;
        }
        if (spin_ns > 0) {
            long end = now_ns() + spin_ns;
            struct pollfd p = {s->tap, POLLIN, 0};
            while (now_ns() < end && !incoming(s) && !(blocked && room(s)) &&
                   (blocked || poll(&p, 1, 0) == 0))
                ;
            if (incoming(s) || (blocked && room(s)) || (!blocked && (p.revents & POLLIN))) {
                readable = 1;
                continue;
            }
        }
        /* Say we sleep, then look once more: pairs with the fence in wake_peer(). */
        atomic_store_explicit(me, blocked ? ASLEEP_FOR_ROOM : ASLEEP, memory_order_relaxed);
        atomic_thread_fence(memory_order_seq_cst);
        if (!incoming(s) && !(blocked && room(s))) {
            struct pollfd p[2] = {{s->efd, POLLIN, 0}, {blocked ? -1 : s->tap, POLLIN, 0}};
            if (poll(p, 2, -1) < 0 && errno != EINTR)
                die("poll");
            uint64_t v;
            if (p[0].revents & POLLIN)
                (void)!read(s->efd, &v, sizeof v);
        }
        atomic_store_explicit(me, AWAKE, memory_order_relaxed);
        readable = 1;
    }
    return NULL;
}

int main(int argc, char **argv) {
    int i = 1;
    if (argc > 0 && argv[0][0])
        prog = argv[0];
    for (; i < argc && argv[i][0] == '-'; i++) {
        if (strcmp(argv[i], "--copy") == 0)
            copy_mode = 1;
        else if (strcmp(argv[i], "--sum") == 0)
            copy_mode = sum_mode = 1;
        else if (strcmp(argv[i], "--nt") == 0)
            copy_mode = nt_mode = 1;
        else if (strcmp(argv[i], "--early-room") == 0)
            early_room = 1;
        else if (strcmp(argv[i], "--threads") == 0)
            use_threads = 1;
        else if (strcmp(argv[i], "--spin") == 0 && i + 1 < argc)
            spin_ns = atol(argv[++i]) * 1000L;
        else if (strcmp(argv[i], "--ring") == 0 && i + 1 < argc)
            ring_bytes = (size_t)atol(argv[++i]) * 1024;
        else
            usage();
    }
    if (argc - i != 2 || ring_bytes < 2 * REC_MAX || spin_ns < 0)
        usage();
    const char *na = argv[i], *nb = argv[i + 1];
    int ta = tap_create(na), tb = tap_create(nb);
    size_t hdr = (sizeof(struct shared) + 4095) & ~(size_t)4095;
    unsigned char *m = mmap(NULL, hdr + 2 * ring_bytes, PROT_READ | PROT_WRITE,
                            MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED)
        die("mmap of the rings");
    struct shared *sh = (struct shared *)m;
    unsigned char *r0 = m + hdr, *r1 = m + hdr + ring_bytes;
    int ea = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC), eb = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (ea < 0 || eb < 0)
        die("eventfd");
    struct side a = {0, ta, ea, eb, na, sh, r0, r1}, b = {1, tb, eb, ea, nb, sh, r1, r0};
    if (use_threads) {
        pthread_t t;
        int err = pthread_create(&t, NULL, run, &b);
        if (err) {
            errno = err;
            die("pthread_create");
        }
        run(&a);
    }
    pid_t parent = getpid();
    pid_t child = fork();
    if (child < 0)
        die("fork");
    if (child == 0) {
        /* The second side dies with the first, so killing the relay's PID stops both. */
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (getppid() != parent)
            return 1;
        close(ta);
        run(&b);
    }
    close(tb);
    run(&a);
    return 0;
}
