#!/usr/bin/env python3
"""Capture virtio-net (header, frame) pairs from real TAPs for the offload unit tests.

Run as root from the repository root (see README.md next to this file):

    sudo python3 src/offload/testdata/capture.py src/offload/testdata

It creates two fresh network namespaces (unique names), a TAP in each opened with
IFF_TAP|IFF_NO_PI|IFF_VNET_HDR, a 12-byte little-endian header (TUNSETVNETHDRSZ,
TUNSETVNETLE) and TUNSETOFFLOAD CSUM|TSO4|TSO6|TSO_ECN|USO4|USO6, and relays frames between
the two TAPs the way an ivnet agent does (header and frame as read). Kernel TCP over IPv4,
IPv6 and an 802.1Q VLAN, with ECN (the relay marks some data frames CE so that the sender
answers with CWR), and UDP with UDP_SEGMENT then produce GSO super-frames, partial-checksum
frames and USO frames. A few of them are written as <name>.bin: the 12-byte header followed
by the whole Ethernet frame. Everything is removed on exit, also on Ctrl-C.
"""

import fcntl
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNSETVNETLE = 0x400454DC
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
TUN_F = 0x01 | 0x02 | 0x04 | 0x08 | 0x20 | 0x40  # CSUM TSO4 TSO6 TSO_ECN USO4 USO6
UDP_SEGMENT = 103

MAC_A, MAC_B = "02:00:77:00:00:01", "02:00:77:00:00:02"
V4 = ("10.77.0.1", "10.77.0.2")
V6 = ("fd77::1", "fd77::2")
VLAN_ID = 7
V4_VLAN = ("10.77.7.1", "10.77.7.2")
PORT_TCP, PORT_TCP_ECN, PORT_UDP = 5001, 5003, 5002


def sh(*argv):
    subprocess.run(argv, check=True)


def tap_open(name):
    fd = os.open("/dev/net/tun", os.O_RDWR)
    ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
    fcntl.ioctl(fd, TUNSETIFF, ifr)
    fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", 12))
    fcntl.ioctl(fd, TUNSETVNETLE, struct.pack("i", 1))
    fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F)
    os.set_blocking(fd, False)
    return fd


def describe(buf):
    """(category, info) of a header+frame, or None for frames we do not keep."""
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = struct.unpack_from("<BBHHHH", buf)
    f = buf[12:]
    l3, et = 14, struct.unpack_from("!H", f, 12)[0]
    vlan = et == 0x8100
    if vlan:
        l3, et = 18, struct.unpack_from("!H", f, 16)[0]
    if et == 0x0800:
        ver, proto, l4 = 4, f[l3 + 9], l3 + (f[l3] & 15) * 4
    elif et == 0x86DD:
        ver, proto, l4 = 6, f[l3 + 6], l3 + 40
    else:
        return None
    if proto == 6:
        hl = l4 + (f[l4 + 12] >> 4) * 4
        tcpflags = f[l4 + 13]
        kind = "tcp"
    elif proto == 17:
        hl, tcpflags, kind = l4 + 8, 0, "udp"
    else:
        return None
    payload = len(f) - hl
    name = f"{kind}{ver}" + ("_vlan" if vlan else "")
    if gso_type & 0x80:
        name += "_ecn"
    if gso_type & 0x7F:
        name += "_uso" if kind == "udp" else "_gso"
    elif flags & 1:
        name += "_csum"
    else:
        return None
    return name, dict(payload=payload, gso_size=gso_size, tcpflags=tcpflags, len=len(f))


class Recorder:
    """Keeps a few interesting frames per category, not the whole stream."""

    def __init__(self):
        self.lock = threading.Lock()
        self.best = {}  # name -> bytes
        self.counts = {}

    def offer(self, buf):
        d = describe(buf)
        if d is None:
            return
        name, info = d
        with self.lock:
            self.counts[name] = self.counts.get(name, 0) + 1
            if name.endswith("_csum"):
                # The first one (a SYN or an ACK for TCP, a small datagram for UDP).
                self.best.setdefault(name, buf)
                if info["payload"] > 0:
                    self.best.setdefault(name + "_data", buf)
                return
            segs = -(-info["payload"] // info["gso_size"]) if info["gso_size"] else 0
            if name in ("tcp4_gso",):
                cur = self.best.get(name)
                if cur is None or len(buf) > len(cur):
                    self.best[name] = buf
            elif segs >= 3 and info["len"] < 24000:
                self.best.setdefault(name, buf)
            # The smallest example of each special case keeps the fixtures small.
            for suffix, hit in (("_fin", info["tcpflags"] & 0x01),
                                ("_tail", info["gso_size"] and info["payload"] % info["gso_size"]),
                                ("_cwr", info["tcpflags"] & 0x80)):
                cur = self.best.get(name + suffix)
                if hit and segs >= 2 and (cur is None or len(buf) < len(cur)):
                    self.best[name + suffix] = buf


def mark_ce(buf):
    """Sets ECN CE on an ECT data frame to the ECN port (IPv4 checksum fixed), every 8th."""
    f = bytearray(buf)
    l3 = 12 + 14
    et = struct.unpack_from("!H", f, 24)[0]
    if et == 0x8100:
        l3 += 4
        et = struct.unpack_from("!H", f, 28)[0]
    if et == 0x0800 and f[l3 + 9] == 6:
        l4 = l3 + (f[l3] & 15) * 4
        if struct.unpack_from("!H", f, l4 + 2)[0] != PORT_TCP_ECN or f[l3 + 1] & 3 == 0:
            return buf
        f[l3 + 1] |= 3
        f[l3 + 10 : l3 + 12] = b"\0\0"
        s = sum(struct.unpack_from("!%dH" % ((l4 - l3) // 2), f, l3))
        while s >> 16:
            s = (s & 0xFFFF) + (s >> 16)
        struct.pack_into("!H", f, l3 + 10, ~s & 0xFFFF)
        return bytes(f)
    if et == 0x86DD and f[l3 + 6] == 6:
        l4 = l3 + 40
        if struct.unpack_from("!H", f, l4 + 2)[0] != PORT_TCP_ECN or f[l3 + 1] & 0x30 == 0:
            return buf
        f[l3 + 1] |= 0x30
        return bytes(f)
    return buf


def relay(fa, fb, rec, stop):
    n = 0
    while not stop.is_set():
        r, _, _ = select.select([fa, fb], [], [], 0.1)
        for src in r:
            dst = fb if src == fa else fa
            while True:
                try:
                    buf = os.read(src, 70000)
                except BlockingIOError:
                    break
                rec.offer(buf)
                if src == fa and struct.unpack_from("B", buf, 1)[0] & 0x7F:
                    n += 1
                    if n % 8 == 0:
                        buf = mark_ce(buf)
                while True:
                    try:
                        os.write(dst, buf)
                        break
                    except BlockingIOError:
                        select.select([], [dst], [], 0.1)
                    except OSError as e:
                        print("write failed:", e, file=sys.stderr)
                        break


SERVER = r"""
import socket, sys, threading
def drain(c):
    while c.recv(1 << 20):
        pass
    c.close()
def tcp(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port)); s.listen(8)
    while True:
        c, _ = s.accept()
        threading.Thread(target=drain, args=(c,), daemon=True).start()
def udp(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    while True:
        s.recv(65536)
for p in (%d, %d):
    threading.Thread(target=tcp, args=(p,), daemon=True).start()
threading.Thread(target=udp, args=(%d,), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
""" % (PORT_TCP, PORT_TCP_ECN, PORT_UDP)


def send_tcp(addr, port, nbytes, family):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect((addr, port))
    chunk = bytes((i * 7 + 1) & 0xFF for i in range(1 << 16))
    sent = 0
    while sent < nbytes:
        sent += s.send(chunk[: min(len(chunk), nbytes - sent)])
    s.shutdown(socket.SHUT_WR)
    s.recv(1)  # wait for the peer's FIN
    s.close()


def send_udp(addr, family, gso_size, total):
    s = socket.socket(family, socket.SOCK_DGRAM)
    if gso_size:
        s.setsockopt(socket.SOL_UDP, UDP_SEGMENT, gso_size)
    s.sendto(bytes(i & 0xFF for i in range(total)), (addr, PORT_UDP))
    s.close()


def inner(ns_a, ns_b, outdir, tag):
    tap_a, tap_b = f"ivc{tag}a", f"ivc{tag}b"
    fa, fb = tap_open(tap_a), tap_open(tap_b)
    sh("ip", "link", "set", tap_b, "netns", ns_b)
    for ns, tap, mac, i, peer_mac in ((None, tap_a, MAC_A, 0, MAC_B), (ns_b, tap_b, MAC_B, 1, MAC_A)):
        ip = ["ip"] + (["-n", ns] if ns else [])
        sh(*ip, "link", "set", "lo", "up")
        sh(*ip, "link", "set", tap, "address", mac, "up")
        sh(*ip, "addr", "add", f"{V4[i]}/24", "dev", tap)
        sh(*ip, "-6", "addr", "add", f"{V6[i]}/64", "dev", tap, "nodad")
        sh(*ip, "neigh", "replace", V4[1 - i], "lladdr", peer_mac, "dev", tap)
        sh(*ip, "-6", "neigh", "replace", V6[1 - i], "lladdr", peer_mac, "dev", tap)
        vl = f"{tap}.{VLAN_ID}"
        r = subprocess.run([*ip, "link", "add", "link", tap, "name", vl, "type", "vlan", "id",
                            str(VLAN_ID)], stderr=subprocess.DEVNULL)
        vlan = r.returncode == 0
        if vlan:
            sh(*ip, "link", "set", vl, "address", mac, "up")
            sh(*ip, "addr", "add", f"{V4_VLAN[i]}/24", "dev", vl)
            sh(*ip, "neigh", "replace", V4_VLAN[1 - i], "lladdr", peer_mac, "dev", vl)
        else:
            print("no 802.1Q support in this kernel: no VLAN frames captured", file=sys.stderr)
        pre = ["ip", "netns", "exec", ns] if ns else []
        sh(*pre, "sysctl", "-qw", "net.ipv4.tcp_ecn=1")
    rec, stop = Recorder(), threading.Event()
    t = threading.Thread(target=relay, args=(fa, fb, rec, stop), daemon=True)
    t.start()
    server = subprocess.Popen(
        ["ip", "netns", "exec", ns_b, sys.executable, "-c", SERVER],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        if server.stdout.readline().strip() != "ready":
            raise SystemExit("server did not start")
        send_udp(V4[1], socket.AF_INET, 0, 100)
        send_udp(V6[1], socket.AF_INET6, 0, 101)
        send_udp(V4[1], socket.AF_INET, 1200, 1200 * 4 + 333)
        send_udp(V6[1], socket.AF_INET6, 1180, 1180 * 5)
        send_tcp(V4[1], PORT_TCP, 8 << 20, socket.AF_INET)
        send_tcp(V6[1], PORT_TCP, 4 << 20, socket.AF_INET6)
        if vlan:
            send_tcp(V4_VLAN[1], PORT_TCP, 4 << 20, socket.AF_INET)
        send_tcp(V4[1], PORT_TCP_ECN, 8 << 20, socket.AF_INET)
        send_tcp(V6[1], PORT_TCP_ECN, 8 << 20, socket.AF_INET6)
        time.sleep(0.5)  # let the last ACKs and FINs pass the relay
    finally:
        stop.set()
        t.join()
        server.stdin.close()
        server.kill()
        server.wait()
    print("frames seen per category:", dict(sorted(rec.counts.items())))
    written = set()
    for name, buf in sorted(rec.best.items()):
        if buf in written:
            continue
        written.add(buf)
        path = os.path.join(outdir, name + ".bin")
        with open(path, "wb") as out:
            out.write(buf)
        print(f"{path}: {len(buf) - 12} bytes, header {buf[:12].hex()}")


def main():
    if len(sys.argv) == 6 and sys.argv[1] == "--inner":
        inner(*sys.argv[2:])
        return
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    outdir = os.path.abspath(sys.argv[1])
    tag = f"{os.getpid() % 100000}"
    ns_a, ns_b = f"ivoffcap{tag}a", f"ivoffcap{tag}b"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        sh("ip", "netns", "add", ns_a)
        sh("ip", "netns", "add", ns_b)
        sh("ip", "netns", "exec", ns_a, sys.executable, os.path.abspath(__file__),
           "--inner", ns_a, ns_b, outdir, tag)
    finally:
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
