#!/usr/bin/env python3
"""Hand frames produced by ivnet's segmenter to a real kernel and check that it accepts every
checksum. Run as root (see README.md next to this file):

    IVNET_OFFLOAD_DUMP=/tmp/ivseg cargo test --lib dump_segments_for_kernel_check -- --ignored
    sudo python3 src/offload/testdata/kernel_check.py /tmp/ivseg

A TAP without IFF_VNET_HDR in a fresh namespace, with the fixtures' receiver addresses, gets
every frame; the kernel then verifies the IPv4 header, TCP and UDP checksums in software. The
check passes if its checksum-error counters stay at zero while every frame is counted as
received. A control frame with one payload byte flipped must raise the TCP error counter.
"""

import fcntl
import os
import struct
import subprocess
import sys

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000


def counters():
    c = {}
    with open("/proc/net/snmp") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        proto = names.split(":")[0]
        for n, v in zip(names.split()[1:], values.split()[1:]):
            c[f"{proto}{n}"] = int(v)
    with open("/proc/net/snmp6") as f:
        for line in f:
            n, v = line.split()
            c[n] = int(v)
    return c


def frames(path):
    data = open(path, "rb").read()
    i = 0
    while i < len(data):
        (n,) = struct.unpack_from("<I", data, i)
        yield data[i + 4 : i + 4 + n]
        i += 4 + n


def inner(dump):
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", b"ivkchk", IFF_TAP | IFF_NO_PI))
    for cmd in (["link", "set", "lo", "up"],
                ["link", "set", "ivkchk", "address", "02:00:77:00:00:02", "up"],
                ["addr", "add", "10.77.0.2/24", "dev", "ivkchk"],
                ["-6", "addr", "add", "fd77::2/64", "dev", "ivkchk", "nodad"]):
        subprocess.run(["ip", *cmd], check=True)
    all_frames = []
    for name in sorted(os.listdir(dump)):
        if name.endswith(".frames"):
            all_frames += list(frames(os.path.join(dump, name)))
    tcp = sum(1 for f in all_frames if f[23 if f[12:14] == b"\x08\x00" else 20] == 6)
    udp = len(all_frames) - tcp
    before = counters()
    for f in all_frames:
        os.write(fd, f)
    after = counters()
    d = {k: after[k] - before.get(k, 0) for k in after}
    print(f"{len(all_frames)} frames ({tcp} TCP, {udp} UDP) from {dump}")
    bad = {k: d[k] for k in ("IpInHdrErrors", "TcpInCsumErrors", "UdpInCsumErrors",
                             "Udp6InCsumErrors", "Ip6InHdrErrors") if d.get(k)}
    got_tcp, got_udp = d["TcpInSegs"], d["UdpNoPorts"] + d["UdpInDatagrams"] + d["Udp6NoPorts"] + d["Udp6InDatagrams"]
    print(f"kernel: TcpInSegs +{got_tcp}, UDP datagrams +{got_udp}, errors {bad or 'none'}")
    ok = not bad and got_tcp == tcp and got_udp == udp
    # Control: a damaged TCP segment must be caught, or this check proves nothing.
    ctl = bytearray(next(f for f in all_frames if f[12:14] == b"\x08\x00" and f[23] == 6))
    ctl[-1] ^= 0x55
    before = counters()
    os.write(fd, bytes(ctl))
    caught = counters()["TcpInCsumErrors"] - before["TcpInCsumErrors"]
    print(f"control frame with a flipped byte: TcpInCsumErrors +{caught}")
    ok = ok and caught == 1
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--inner":
        inner(sys.argv[2])
        return
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    ns = f"ivoffchk{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__),
                            "--inner", os.path.abspath(sys.argv[1])])
        sys.exit(r.returncode)
    finally:
        subprocess.run(["ip", "netns", "del", ns])


if __name__ == "__main__":
    main()
