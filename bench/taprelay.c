/* taprelay: the smallest honest TAP <-> TAP relay, a baseline for bench/table.sh.
 *
 * Creates two TAP interfaces and copies every frame read from one into the other, one blocking
 * thread per direction, one read() and one write() per frame, no batching, no ring. With
 * --vnet both TAPs are opened with IFF_VNET_HDR (a virtio-net header before each frame) and
 * TUNSETOFFLOAD (checksum, TSO4, TSO6, TSO_ECN), so the kernel hands over and accepts
 * unsegmented TCP super-frames of up to 64 KiB with a partial checksum: the same offloads an
 * ivnet agent uses, without anything else an agent does. Both TAPs use the same header size,
 * so a frame needs no translation.
 *
 * The TAPs are created in the caller's network namespace; move them elsewhere with
 * `ip link set NAME netns NS` (the relay keeps working: it holds the file descriptors).
 * Runs until killed. Build: gcc -O2 -pthread -o taprelay taprelay.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

/* virtio_net_hdr_mrg_rxbuf: the 10-byte virtio-net header plus num_buffers, as ivnet uses. */
#define VNET_HDR_LEN 12
/* A TSO super-frame is at most 64 KiB of IP packet plus the Ethernet and virtio headers;
 * without offloads a frame is at most 65521 (TAP MTU) + 14. Round up generously. */
#define BUF_LEN (128 * 1024)

static const char *prog = "taprelay";

static void usage(void) {
    fprintf(stderr,
            "usage: %s [--vnet] TAP_A TAP_B\n"
            "  Creates TAP_A and TAP_B and relays frames between them until killed.\n"
            "  --vnet  IFF_VNET_HDR (%d-byte header) + TUNSETOFFLOAD csum/TSO4/TSO6/TSO_ECN\n",
            prog, VNET_HDR_LEN);
    exit(2);
}

static int tap_create(const char *name, int vnet) {
    if (strlen(name) >= IFNAMSIZ) {
        fprintf(stderr, "%s: interface name '%s' is longer than %d characters\n", prog, name,
                IFNAMSIZ - 1);
        exit(1);
    }
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        fprintf(stderr, "%s: open /dev/net/tun: %s (needs root and the tun module)\n", prog,
                strerror(errno));
        exit(1);
    }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI | (vnet ? IFF_VNET_HDR : 0);
    memcpy(ifr.ifr_name, name, strlen(name));
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
        fprintf(stderr, "%s: creating TAP %s (TUNSETIFF): %s\n", prog, name, strerror(errno));
        exit(1);
    }
    if (vnet) {
        int sz = VNET_HDR_LEN;
        if (ioctl(fd, TUNSETVNETHDRSZ, &sz) < 0) {
            fprintf(stderr, "%s: %s: TUNSETVNETHDRSZ %d: %s\n", prog, name, sz, strerror(errno));
            exit(1);
        }
        unsigned long off = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
        if (ioctl(fd, TUNSETOFFLOAD, off) < 0) {
            fprintf(stderr, "%s: %s: TUNSETOFFLOAD csum|tso4|tso6|tso_ecn: %s\n", prog, name,
                    strerror(errno));
            exit(1);
        }
    }
    return fd;
}

struct direction {
    int from, to;
    const char *from_name, *to_name;
};

static void *relay(void *arg) {
    const struct direction *d = arg;
    unsigned char *buf = malloc(BUF_LEN);
    if (!buf) {
        fprintf(stderr, "%s: out of memory\n", prog);
        exit(1);
    }
    unsigned long long frames = 0, dropped = 0;
    for (;;) {
        ssize_t n = read(d->from, buf, BUF_LEN);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fprintf(stderr, "%s: read from %s: %s (after %llu frames)\n", prog, d->from_name,
                    strerror(errno), frames);
            exit(1);
        }
        if (n == 0) {
            fprintf(stderr, "%s: %s closed\n", prog, d->from_name);
            exit(1);
        }
        frames++;
        /* A frame the other side cannot take (down, queue full, bad header) is dropped, as a
         * NIC would drop it; say so once in a while, not per frame. */
        if (write(d->to, buf, (size_t)n) != n) {
            dropped++;
            if ((dropped & (dropped - 1)) == 0) /* 1, 2, 4, 8, ... */
                fprintf(stderr, "%s: %llu frames to %s dropped so far (last: %s)\n", prog,
                        dropped, d->to_name, strerror(errno));
        }
    }
    return NULL;
}

int main(int argc, char **argv) {
    int vnet = 0, i = 1;
    if (argc > 0 && argv[0][0])
        prog = argv[0];
    if (i < argc && strcmp(argv[i], "--vnet") == 0) {
        vnet = 1;
        i++;
    }
    if (argc - i != 2 || argv[i][0] == '-' || argv[i + 1][0] == '-')
        usage();
    const char *na = argv[i], *nb = argv[i + 1];
    int a = tap_create(na, vnet), b = tap_create(nb, vnet);
    struct direction ab = {a, b, na, nb}, ba = {b, a, nb, na};
    pthread_t t;
    int err = pthread_create(&t, NULL, relay, &ab);
    if (err) {
        fprintf(stderr, "%s: pthread_create: %s\n", prog, strerror(err));
        return 1;
    }
    relay(&ba);
    return 0;
}
