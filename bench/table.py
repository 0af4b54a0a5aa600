#!/usr/bin/env python3
"""Summary of a bench/table.sh run: reads OUT/samples.tsv, OUT/meta.tsv and the raw tool outputs
they name, and writes OUT/table.md, OUT/table.json and OUT/ratios.svg.

Usage: python3 bench/table.py OUT_DIR      (bench/table.sh calls it; rerun it on an old OUT_DIR
                                            to regenerate the three files)

Standard library only. Every figure is a median over the repetitions with [min-max]; ratios
are medians divided by veth's median from the same run (and by socat's or the C vnet relay's
where the issue's targets name them).
"""

import json
import math
import re
import statistics
import sys
from pathlib import Path

ROW_ORDER = [
    "veth",
    "socat",
    "crelay-vnet",
    "crelay",
    "cring",
    "cring-early",
    "cring-copy",
    "cring-sum",
    "cring-nt",
    "cring-sum-nt",
    "cring-threads",
    "ivnet-file-on",
    "ivnet-file-off",
    "ivnet-doorbell-on",
    "ivnet-doorbell-off",
    "ivnet-adaptive-on",
    "ivnet-adaptive-off",
    "ivnet-file-trust",
    "ivnet-doorbell-trust",
    "ivnet-adaptive-trust",
]

ROW_TEXT = {
    "veth": "veth pair (kernel)",
    "socat": "socat between two TAPs",
    "crelay-vnet": "C TAP relay, vnet_hdr + TSO",
    "crelay": "C TAP relay, no offloads",
    "cring": ("C ring relay (`bench/ringrelay.c`): two processes, one TAP each (vnet_hdr +"
              " TSO), joined by two shared-memory rings; frames read straight into the ring,"
              " partial checksums passed on"),
    "cring-early": ("C ring relay returning ring room each quarter of the ring consumed (as ivnet"
                    " does), not only at the end of a batch"),
    "cring-copy": "C ring relay, each frame read into a buffer and copied into the ring",
    "cring-sum": ("C ring relay, checksums completed while copying into the ring and verified"
                  " by the receiving kernel (ivnet's integrity rule)"),
    "cring-nt": "C ring relay, copying into the ring with streaming stores",
    "cring-sum-nt": ("C ring relay with ivnet's integrity rule and streaming stores: a summing"
                     " copy into the ring, checksums verified by the receiving kernel"),
    "cring-threads": "C ring relay as two threads of one process",
    "ivnet-file-on": "ivnet file (polling), offload on",
    "ivnet-file-off": "ivnet file (polling), offload off",
    "ivnet-doorbell-on": "ivnet doorbell, offload on",
    "ivnet-doorbell-off": "ivnet doorbell, offload off",
    "ivnet-adaptive-on": "ivnet adaptive, offload on",
    "ivnet-adaptive-off": "ivnet adaptive, offload off",
    "ivnet-file-trust": "ivnet file (polling), offload on, --trust-peer-checksums",
    "ivnet-doorbell-trust": "ivnet doorbell, offload on, --trust-peer-checksums",
    "ivnet-adaptive-trust": "ivnet adaptive, offload on, --trust-peer-checksums",
}


class Metric:
    """One column: which sample workload it comes from, how to read it, unit, direction."""

    def __init__(self, key, source, title, unit, higher_better, fmt, vs_veth=True):
        self.key = key
        self.source = source
        self.title = title
        self.unit = unit
        self.higher_better = higher_better
        self.fmt = fmt
        self.vs_veth = vs_veth


METRICS = [
    Metric("tcp1500", "tcp1500", "TCP 1500", "Gbit/s", True, "{:.2f}"),
    Metric("tcp9000", "tcp9000", "TCP 9000", "Gbit/s", True, "{:.2f}"),
    Metric("tcp65521", "tcp65521", "TCP 65521", "Gbit/s", True, "{:.2f}"),
    Metric("tcp1500x4", "tcp1500x4", "TCP 1500 x4", "Gbit/s", True, "{:.2f}"),
    Metric("udp-rr-p50", "udp-rr", "UDP RR p50", "us", False, "{:.1f}"),
    Metric("udp-rr-p99", "udp-rr", "UDP RR p99", "us", False, "{:.1f}"),
    Metric("udp64", "udp64", "UDP 64 B rx", "kpps", True, "{:.0f}"),
    Metric("cpu", "cpu", "CPU per GB", "s/GB", False, "{:.2f}", vs_veth=False),
    # A diagnostic, not a target: every context switch on the machine (relay or agents, iperf3,
    # kernel threads) per MB moved during tcp1500.
    Metric("switches", "cpu", "switches per MB", "/MB", False, "{:.1f}", vs_veth=False),
    Metric("idle", "idle", "idle CPU", "% of a core", False, "{:.2f}", vs_veth=False),
    Metric("stack", "stack", "kernel->stack", "Gbit/s", True, "{:.2f}", vs_veth=False),
]
METRIC = {m.key: m for m in METRICS}

# Extra ratio columns that the targets use: (metric, baseline row, column title).
EXTRA_RATIOS = [
    ("tcp1500", "socat", "TCP 1500 / socat"),
    ("tcp1500", "crelay-vnet", "TCP 1500 / C vnet"),
    ("udp64", "socat", "UDP 64 B / socat"),
]


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def parse_iperf_tcp(path):
    return read_json(path)["end"]["sum_received"]["bits_per_second"] / 1e9


def parse_iperf_udp(path):
    end = read_json(path)["end"]
    s = end.get("sum_received") or end["sum"]
    return (s["packets"] - s["lost_packets"]) / s["seconds"] / 1e3


def parse_sockperf(path):
    """Round trip p50 and p99 in us: sockperf's ping-pong percentiles are half round trips."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    out = {}
    for pct, key in (("50.000", "udp-rr-p50"), ("99.000", "udp-rr-p99")):
        m = re.search(r"percentile " + re.escape(pct) + r" =\s*([0-9.]+)", text)
        if not m:
            raise ValueError(f"no percentile {pct} in {path}")
        out[key] = 2 * float(m.group(1))
    return out


def parse_keyvals(path):
    vals = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) >= 2:
            vals.setdefault(parts[0], []).append(parts[1:])
    return vals


def parse_cpu(path):
    """During tcp1500: CPU seconds of the relay or agents per GB that iperf3 received (none for
    veth), and the machine's context switches per MB (older files lack them)."""
    kv = parse_keyvals(path)
    received = read_json(kv["iperf3"][0][0])["end"]["sum_received"]["bytes"]
    out = {}
    if "cpu_ns" in kv:
        out["cpu"] = (int(kv["cpu_ns"][0][0]) / 1e9) / (received / 1e9)
    if "switches" in kv:
        out["switches"] = int(kv["switches"][0][0]) / (received / 1e6)
    return out


def parse_idle(path):
    """The busier agent's CPU over the idle window, % of one core."""
    kv = parse_keyvals(path)
    secs = float(kv["seconds"][0][0])
    per_agent = [int(p[2]) / 1e9 / secs * 100 for p in kv.get("pid", [])]
    if not per_agent:
        raise ValueError(f"no agents in {path}")
    return max(per_agent)


def parse_stack(path):
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    m = re.search(r"^received .*\(([0-9.]+) Gbit/s\)", text, re.M)
    if not m:
        raise ValueError(f"no 'received ... Gbit/s' line in {path}")
    return float(m.group(1))


def values_of(workload, path):
    """The metric values one sample file gives, as {metric key: value}."""
    if workload in ("tcp1500", "tcp9000", "tcp65521", "tcp1500x4"):
        return {workload: parse_iperf_tcp(path)}
    if workload == "udp64":
        return {"udp64": parse_iperf_udp(path)}
    if workload == "udp-rr":
        return parse_sockperf(path)
    if workload == "cpu":
        return parse_cpu(path)
    if workload == "idle":
        return {"idle": parse_idle(path)}
    if workload == "stack":
        return {"stack": parse_stack(path)}
    raise ValueError(f"unknown workload {workload}")


def load(out):
    meta = {}
    for line in (out / "meta.tsv").read_text(encoding="utf-8").splitlines():
        k, _, v = line.partition("\t")
        meta[k] = v
    # rows[row][metric] = {"samples": [...], "rounds": [round of each sample],
    #                      "failed": [{"round", "log", "note"}]}
    rows = {}
    unsupported = {}
    for line in (out / "samples.tsv").read_text(encoding="utf-8").splitlines():
        f = line.split("\t")
        if len(f) < 6:
            continue
        row, workload, rnd, status, path, note = f[:6]
        if status == "unsupported":
            unsupported[row] = note
            continue
        keys = [m.key for m in METRICS if m.source == workload]
        cells = rows.setdefault(row, {})
        for k in keys:
            cells.setdefault(k, {"samples": [], "rounds": [], "failed": []})
        if status == "ok":
            try:
                for k, v in values_of(workload, path).items():
                    cells[k]["samples"].append(v)
                    cells[k]["rounds"].append(rnd)
                continue
            except (OSError, ValueError, KeyError, TypeError, IndexError,
                    ZeroDivisionError) as e:
                note = f"unreadable result: {e}"
        for k in keys:
            cells[k]["failed"].append({"round": rnd, "log": path, "note": note})
    return meta, rows, unsupported


def summarize(rows):
    for cells in rows.values():
        for c in cells.values():
            s = c["samples"]
            if s:
                c["median"] = statistics.median(s)
                c["min"] = min(s)
                c["max"] = max(s)


def median_of(rows, row, key):
    return rows.get(row, {}).get(key, {}).get("median")


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def round_ratios(rows, row, base, key):
    """The ratio row / base of each round that measured both: rows of one round run minutes
    apart rather than the whole run, so their spread shows how steady a ratio of medians is."""
    a = rows.get(row, {}).get(key, {})
    b = rows.get(base, {}).get(key, {})
    by_round = dict(zip(b.get("rounds", []), b.get("samples", [])))
    return [v / by_round[r] for r, v in zip(a.get("rounds", []), a.get("samples", []))
            if by_round.get(r)]


def ordered(rows, unsupported):
    names = set(rows) | set(unsupported)
    return [r for r in ROW_ORDER if r in names] + sorted(names - set(ROW_ORDER))


def cell_text(rows, unsupported, row, m, selected):
    if row in unsupported:
        return "unsupported"
    c = rows.get(row, {}).get(m.key)
    if c is not None and not c["samples"] and not c["failed"]:
        c = None  # the workload ran but gives no such figure for this row (veth's own CPU)
    if c is None:
        applies = m.key not in ("stack", "idle") or row.startswith("ivnet-")
        if m.key == "cpu" and row == "veth":
            applies = False
        if not applies:
            return "n/a"
        return "-" if m.source not in selected else "failed"
    if "median" not in c:
        return "failed"
    text = f"{m.fmt.format(c['median'])} [{m.fmt.format(c['min'])}-{m.fmt.format(c['max'])}]"
    if c["failed"]:
        text += f" ({len(c['samples'])} of {len(c['samples']) + len(c['failed'])})"
    if m.vs_veth and row != "veth":
        r = ratio(c["median"], median_of(rows, "veth", m.key))
        if r is not None:
            text += f" {r:.2f}x"
    return text


# ---- targets ---------------------------------------------------------------------------------

ON_ROWS = ["ivnet-file-on", "ivnet-doorbell-on", "ivnet-adaptive-on"]
OFF_ROWS = ["ivnet-file-off", "ivnet-doorbell-off", "ivnet-adaptive-off"]


def target_rows(rows, key, candidates=None):
    """The ivnet rows a target is judged on: those with offloads on that have this figure; if
    none has it (e.g. a binary without --offload), the offload-off rows, with a note."""
    cands = candidates or ON_ROWS
    on = [r for r in cands if median_of(rows, r, key) is not None]
    if on:
        return on, ""
    off = [r.replace("-on", "-off") for r in cands]
    off = [r for r in off if median_of(rows, r, key) is not None]
    return off, "offload-on rows not measured: judged on offload-off rows"


def evaluate_targets(rows, unsupported):
    out = []

    def ratio_target(name, key, base, op, limit, candidates=None):
        rs, note = target_rows(rows, key, candidates)
        b = median_of(rows, base, key)
        if not rs or b is None:
            why = f"no {METRIC[key].title} for {base}" if b is None else "no ivnet row measured"
            out.append({"target": name, "row": "-", "value": None, "met": None, "text": why})
            return
        unit = METRIC[key].unit
        fmt = METRIC[key].fmt
        for r in rs:
            v = median_of(rows, r, key)
            q = v / b
            met = q >= limit if op == ">=" else q <= limit
            per_round = round_ratios(rows, r, base, key)
            spread = (f"; rounds {min(per_round):.2f}-{max(per_round):.2f}x"
                      if len(per_round) > 1 else "")
            out.append({
                "target": name, "row": r, "value": q, "limit": limit, "op": op, "met": met,
                "rounds": per_round,
                "text": f"{q:.2f}x ({fmt.format(v)} / {fmt.format(b)} {unit}){spread}"
                + (f"; {note}" if note else ""),
            })

    ratio_target("TCP 1500 >= 0.75x veth", "tcp1500", "veth", ">=", 0.75)
    ratio_target("TCP 1500 >= 8x socat", "tcp1500", "socat", ">=", 8.0)
    ratio_target("TCP 1500 >= 0.9x C vnet relay", "tcp1500", "crelay-vnet", ">=", 0.9)
    ratio_target("TCP 65521 >= 0.9x veth", "tcp65521", "veth", ">=", 0.9)
    ratio_target("UDP RR p50 (adaptive) <= 1.5x veth", "udp-rr-p50", "veth", "<=", 1.5,
                 candidates=["ivnet-adaptive-on"])
    ratio_target("UDP 64 B rate >= 1.5x socat", "udp64", "socat", ">=", 1.5)

    # Kernel -> stack "no slower than before": the offload-on row against the same mode with
    # offloads off (the data path before issue 9 had none) in the same run, 5% noise allowed.
    name = "kernel -> stack no slower than before (on >= 0.95x off)"
    any_pair = False
    for on in ON_ROWS:
        off = on.replace("-on", "-off")
        v, w = median_of(rows, on, "stack"), median_of(rows, off, "stack")
        if v is None or w is None:
            continue
        any_pair = True
        q = v / w
        out.append({"target": name, "row": on, "value": q, "limit": 0.95, "op": ">=",
                    "met": q >= 0.95,
                    "text": f"{q:.2f}x ({v:.2f} / {w:.2f} Gbit/s of {off})"})
    if not any_pair:
        why = ("offload-on rows unsupported by this binary" if any(r in unsupported
                                                                   for r in ON_ROWS)
               else "needs an -on and an -off row of the same mode")
        off = [(r, median_of(rows, r, "stack")) for r in OFF_ROWS]
        off = ", ".join(f"{r} {v:.2f} Gbit/s" for r, v in off if v is not None)
        out.append({"target": name, "row": "-", "value": None, "met": None,
                    "text": f"not evaluated: {why}" + (f" (measured: {off})" if off else "")})

    name = "idle agent in doorbell mode < 1% of a core"
    rs = [r for r in ("ivnet-doorbell-on", "ivnet-doorbell-off")
          if median_of(rows, r, "idle") is not None]
    for r in rs:
        c = rows[r]["idle"]
        out.append({"target": name, "row": r, "value": c["median"], "limit": 1.0, "op": "<",
                    "met": c["median"] < 1.0,
                    "text": f"{c['median']:.2f}% [{c['min']:.2f}-{c['max']:.2f}] (busier agent)"})
    if not rs:
        out.append({"target": name, "row": "-", "value": None, "met": None,
                    "text": "no doorbell row with an idle measurement"})
    return out


# The steps from the C relay to ivnet, each a path measured in the same run: what splitting the
# relay in two with rings costs, what ivnet's integrity rule and stores cost on top, and what the
# rest of ivnet costs (`gap` below).
GAP_STEPS = [
    ("cring", "two processes joined by shared-memory rings (ivnet's shape, nothing else)"),
    ("cring-early", "the same returning ring room each quarter of the ring, as ivnet does"),
    ("cring-sum-nt", "the same with ivnet's integrity rule and streaming stores"),
] + [(r, "ivnet: the above and everything an agent does besides") for r in ON_ROWS] + [
    (r.replace("-on", "-trust"),
     "ivnet trusting its peers' checksums: no integrity rule, frames read into the ring")
    for r in ON_ROWS
]


def gap(rows):
    """TCP 1500 and CPU per GB of each step in GAP_STEPS against the C relay with offloads, or
    [] when the relay or the ring relay was not measured."""
    base = median_of(rows, "crelay-vnet", "tcp1500")
    if base is None or median_of(rows, "cring", "tcp1500") is None:
        return []
    out = []
    for r, what in GAP_STEPS:
        v = median_of(rows, r, "tcp1500")
        if v is None:
            continue
        per_round = round_ratios(rows, r, "crelay-vnet", "tcp1500")
        out.append({"row": r, "what": what, "tcp1500": v, "ratio": v / base,
                    "rounds": per_round, "cpu": median_of(rows, r, "cpu"),
                    "switches": median_of(rows, r, "switches")})
    return out


# ---- Markdown --------------------------------------------------------------------------------

def markdown(meta, rows, unsupported, targets, offloads, out):
    selected = set(meta.get("workloads", "").split())
    if "tcp1500" in selected:
        selected.add("cpu")
    metrics = [m for m in METRICS if m.source in selected
               and any(m.key in rows.get(r, {}) for r in rows)]
    names = ordered(rows, unsupported)
    dirty = " (dirty: uncommitted changes)" if meta.get("dirty") == "1" else ""
    L = []
    L.append(f"## Benchmark table, {meta.get('date', '?')}")
    L.append("")
    L.append(f"- commit {meta.get('commit', '?')}{dirty}; `bench/table.sh`, REPS={meta.get('reps')}"
             f" x TIME={meta.get('time')} s, measured in {meta.get('duration_s', '?')} s")
    L.append(f"- machine: {meta.get('cpu', '?')}, {meta.get('nproc', '?')} CPUs, kernel "
             f"{meta.get('kernel', '?')}; load average at start {meta.get('load_start', '?')},"
             f" at end {meta.get('load_end', '?')}; CPU time stolen by the host"
             f" {meta.get('steal_pct', '?')}%; TCP congestion control"
             f" {meta.get('tcp_cc', 'not recorded')}")
    if meta.get("ivnet", "-") != "-":
        flag = "has `--offload`" if meta.get("offload_flag") == "1" else "no `--offload` flag"
        L.append(f"- ivnet: `{meta.get('ivnet')}` ({meta.get('ivnet_version', '?')}, {flag});"
                 f" extra agent flags: `{meta.get('agent_args') or 'none'}`; extra server flags:"
                 f" `{meta.get('server_args') or 'none'}`; adaptive --spin-us:"
                 f" {meta.get('spin_us', 'default')}; region {meta.get('region_size', '?')}")
    L.append(f"- tools: {meta.get('tools', '?')}")
    L.append("")
    L.append("Median [min-max] over the repetitions, then the ratio of medians to veth from this"
             " run (throughput: higher is better; latency, CPU: lower is better). \"(2 of 3)\": a"
             " repetition failed (see Failures).")
    L.append("")
    head = ["path"]
    for m in metrics:
        head.append(f"{m.title} {m.unit}")
        for key, base, title in EXTRA_RATIOS:
            if key == m.key and base in rows:
                head.append(title)
    L.append("| " + " | ".join(head) + " |")
    L.append("|" + "---|" * len(head))
    for r in names:
        cells = [r]
        for m in metrics:
            cells.append(cell_text(rows, unsupported, r, m, selected))
            for key, base, _ in EXTRA_RATIOS:
                if key == m.key and base in rows:
                    q = ratio(median_of(rows, r, key), median_of(rows, base, key))
                    cells.append(f"{q:.2f}x" if q is not None and r != base else "")
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    L.append("### Targets (issue 9)")
    L.append("")
    L.append("| target | path | measured | met |")
    L.append("|---|---|---|---|")
    for t in targets:
        met = {True: "met", False: "**not met**", None: "-"}[t["met"]]
        L.append(f"| {t['target']} | {t['row']} | {t['text']} | {met} |")
    L.append("")
    steps = gap(rows)
    if steps:
        relay_cpu = median_of(rows, "crelay-vnet", "cpu")
        cpu_text = f", {relay_cpu:.2f} s/GB" if relay_cpu is not None else ""
        L.append("### From the C relay to ivnet (TCP 1500)")
        L.append("")
        L.append(f"Each step against `crelay-vnet` ({median_of(rows, 'crelay-vnet', 'tcp1500'):.2f}"
                 f" Gbit/s{cpu_text}) in this run; the rounds' range in brackets.")
        L.append("")
        L.append("| path | what it adds | Gbit/s | / C vnet relay | CPU s/GB | switches/MB |")
        L.append("|---|---|---|---|---|---|")
        for st in steps:
            rr = st["rounds"]
            spread = f" [{min(rr):.2f}-{max(rr):.2f}]" if len(rr) > 1 else ""
            cpu = f"{st['cpu']:.2f}" if st["cpu"] is not None else "-"
            sw = f"{st['switches']:.1f}" if st["switches"] is not None else "-"
            L.append(f"| {st['row']} | {st['what']} | {st['tcp1500']:.2f} |"
                     f" {st['ratio']:.2f}x{spread} | {cpu} | {sw} |")
        L.append("")
    L.append("### Paths and workloads")
    L.append("")
    for r in names:
        extra = f"; offloads of A's interface: {offloads[r]}" if r in offloads else ""
        if r.endswith("-on") and "tso off" in offloads.get(r, ""):
            extra += " (**TSO is off on the TAP although the agents ran with --offload on**)"
        note = f" **{unsupported[r]}**" if r in unsupported else ""
        L.append(f"- `{r}`: {ROW_TEXT.get(r, r)}{extra}.{note}")
    t, idle = meta.get("time", "?"), meta.get("idle_time", "?")
    mib = int(meta.get("stack_bytes", 0) or 0) >> 20
    L.append("")
    L.append(f"- TCP: `iperf3 -t {t}`, one stream A -> B (x4: `-P 4`), receiver rate, at the MTU"
             " named.")
    L.append(f"- UDP RR: `sockperf ping-pong -m 64 -t {t}`; round trip = 2 x sockperf's half"
             " round trip.")
    L.append(f"- UDP 64 B: `iperf3 -u -l 64 -b 0 -t {t}`, datagrams received per second.")
    L.append("- CPU per GB: CPU time of the relay process or of both agents during TCP 1500, per"
             " GB received (not the doorbell server, which is idle while frames move).")
    L.append(f"- idle: the busier agent's CPU over {idle} s without traffic, starting 1 s after"
             " the last frame, in % of one core.")
    L.append(f"- kernel->stack: the kernel in A sends {mib} MiB over TCP to an `ivnet stack recv`"
             " peer on the same segment; the rate the stack reports.")
    fails = [(r, k, f) for r in names for k, c in rows.get(r, {}).items() for f in c["failed"]]
    if fails:
        L.append("")
        L.append("### Failures")
        L.append("")
        for r, k, f in fails:
            L.append(f"- {r} {k} round {f['round']}: {f['note'] or 'failed'}: `{f['log']}`")
    L.append("")
    L.append(f"Raw results: `{out}` (per path: tool outputs, agent logs, `ivnet status --json`"
             " at the end of each scene, `ethtool -k` of both interfaces).")
    return "\n".join(L) + "\n"


def offload_state(out, rows):
    """A short summary of `ethtool -k` of A's interface at MTU 1500 (or the first MTU)."""
    res = {}
    keys = [("tx-checksumming", "tx-csum"), ("tcp-segmentation-offload", "tso"),
            ("generic-segmentation-offload", "gso"), ("generic-receive-offload", "gro")]
    for r in rows:
        files = sorted((out / "raw" / r).glob("ethtool-A.mtu*.txt"))
        if not files:
            continue
        text = files[0].read_text(encoding="utf-8", errors="replace")
        parts = []
        for k, short in keys:
            m = re.search(r"^" + k + r": (\S+)", text, re.M)
            if m:
                parts.append(f"{short} {m.group(1)}")
        if parts:
            res[r] = ", ".join(parts)
    return res


# ---- SVG -------------------------------------------------------------------------------------

COLORS = {
    "veth": "#555555", "socat": "#b07aa1", "crelay-vnet": "#9c755f", "crelay": "#d4b9a6",
    "cring": "#76b7b2", "cring-copy": "#9fd3cf", "cring-early": "#3b7d78", "cring-threads": "#4f9a94",
    "cring-sum": "#b6992d", "cring-nt": "#d7b5a6", "cring-sum-nt": "#edc948",
    "ivnet-file-on": "#4e79a7", "ivnet-file-off": "#a0c4e8",
    "ivnet-doorbell-on": "#f28e2b", "ivnet-doorbell-off": "#ffc58f",
    "ivnet-adaptive-on": "#59a14f", "ivnet-adaptive-off": "#a8dba0",
    "ivnet-file-trust": "#2c5d8a", "ivnet-doorbell-trust": "#c46a10",
    "ivnet-adaptive-trust": "#3b7a34",
}


def esc(s):
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# Target lines drawn in the chart, as ratios to veth in the chart's direction (latency
# inverted): metric -> (ratio, label).
CHART_TARGETS = {
    "tcp1500": (0.75, "0.75x veth"),
    "tcp65521": (0.9, "0.9x veth"),
    "udp-rr-p50": (1 / 1.5, "adaptive within 1.5x veth"),
}


def nice_bounds(qs):
    """Log-axis bounds on the 1-2-5 sequence around the values, always including 1 (veth)."""
    steps = [k * 10.0 ** e for e in range(-4, 4) for k in (1, 2, 5)]
    lo_v = min(qs + [0.5])
    hi_v = max(qs + [1.2])
    lo = max([s for s in steps if s <= lo_v] or [steps[0]])
    hi = min([s for s in steps if s >= hi_v] or [steps[-1]])
    return lo, hi


def svg_chart(meta, rows, unsupported):
    """Horizontal bars on a log scale, one panel per workload: each path's median against veth's,
    inverted for latency so that a longer bar is always better."""
    names = ordered(rows, unsupported)
    panels = []
    for m in METRICS:
        if not m.vs_veth:
            continue
        base = median_of(rows, "veth", m.key)
        if base is None:
            continue
        bars = []
        for r in names:
            v = median_of(rows, r, m.key)
            q = None if not v else (v / base if m.higher_better else base / v)
            bars.append((r, q))
        if any(q is not None for _, q in bars):
            panels.append((m, bars))
    qs = [q for _, bars in panels for _, q in bars if q]
    qs += [CHART_TARGETS[m.key][0] for m, _ in panels if m.key in CHART_TARGETS]
    lo, hi = nice_bounds(qs)
    bar_h, gap, label_w, plot_w, right = 14, 3, 150, 520, 60
    panel_head = 22
    width = label_w + plot_w + right
    y = 60
    body = []

    def xpos(q):
        q = min(max(q, lo), hi)
        return label_w + plot_w * (math.log10(q) - math.log10(lo)) / (
            math.log10(hi) - math.log10(lo))

    for m, bars in panels:
        title = (f"{m.title}: path / veth" if m.higher_better
                 else f"{m.title}: veth / path (inverted: a longer bar is a shorter time)")
        if m.key in CHART_TARGETS:
            title += "; red: target"
        body.append(f'<text x="{label_w}" y="{y + 14}" font-weight="bold">{esc(title)}</text>')
        top = y + panel_head
        h = len(bars) * (bar_h + gap)
        for e in range(-4, 4):
            for k in (1, 2, 5):
                g = k * 10.0 ** e
                if g < lo * 0.9999 or g > hi * 1.0001:
                    continue
                x = xpos(g)
                stroke = "#999" if k == 1 else "#ddd"
                body.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + h}" '
                            f'stroke="{stroke}" stroke-width="1"/>')
                body.append(f'<text x="{x:.1f}" y="{top + h + 11}" font-size="9" '
                            f'text-anchor="middle" fill="#666">{g:g}</text>')
        x0 = xpos(lo)
        for i, (r, q) in enumerate(bars):
            by = top + i * (bar_h + gap)
            body.append(f'<text x="{label_w - 6}" y="{by + bar_h - 3}" text-anchor="end" '
                        f'font-size="11">{esc(r)}</text>')
            if q is None:
                why = "unsupported" if r in unsupported else "no data"
                body.append(f'<text x="{label_w + 4}" y="{by + bar_h - 3}" font-size="10" '
                            f'fill="#999">{why}</text>')
                continue
            w = max(xpos(q) - x0, 1)
            body.append(f'<rect x="{x0:.1f}" y="{by}" width="{w:.1f}" height="{bar_h}" '
                        f'fill="{COLORS.get(r, "#888")}"><title>{esc(r)} {q:.3f}</title></rect>')
            body.append(f'<text x="{x0 + w + 4:.1f}" y="{by + bar_h - 3}" font-size="10">'
                        f'{q:.2f}</text>' if q >= 0.1 else
                        f'<text x="{x0 + w + 4:.1f}" y="{by + bar_h - 3}" font-size="10">'
                        f'{q:.2g}</text>')
        x1 = xpos(1.0)
        body.append(f'<line x1="{x1:.1f}" y1="{top - 2}" x2="{x1:.1f}" y2="{top + h}" '
                    'stroke="#000" stroke-width="1.5"/>')
        if m.key in CHART_TARGETS:
            xt = xpos(CHART_TARGETS[m.key][0])
            body.append(f'<line x1="{xt:.1f}" y1="{top - 2}" x2="{xt:.1f}" y2="{top + h}" '
                        'stroke="#d62728" stroke-width="1.5" stroke-dasharray="4 3"/>')
        y = top + h + 24
    head = (f'<text x="10" y="20" font-size="14" font-weight="bold">ivnet bench/table.sh: ratios '
            f'to veth (log scale; 1 = veth)</text>'
            f'<text x="10" y="36" font-size="10" fill="#444">{esc(meta.get("date", ""))}, commit '
            f'{esc(meta.get("commit", ""))}{" (dirty)" if meta.get("dirty") == "1" else ""}, '
            f'medians of {esc(meta.get("reps", ""))} x {esc(meta.get("time", ""))} s, '
            f'{esc(meta.get("cpu", ""))}, {esc(meta.get("nproc", ""))} CPUs</text>'
            f'<text x="10" y="50" font-size="10" fill="#d62728">red dashed lines: issue 9 targets '
            f'({esc("; ".join(f"{METRIC[k].title} {t[1]}" for k, t in CHART_TARGETS.items()))})'
            '</text>')
    if not panels:
        head += '<text x="10" y="60">no workload with a veth figure in this run</text>'
        y = 80
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y}" '
            f'viewBox="0 0 {width} {y}" font-family="sans-serif" font-size="11">'
            f'<rect width="100%" height="100%" fill="white"/>{head}' + "".join(body) + "</svg>\n")


# ---- JSON ------------------------------------------------------------------------------------

def json_doc(meta, rows, unsupported, targets, offloads):
    doc = {"meta": meta, "units": {m.key: m.unit for m in METRICS}, "rows": {},
           "targets": targets, "relay_to_ivnet_tcp1500": gap(rows)}
    for r in ordered(rows, unsupported):
        entry = {"description": ROW_TEXT.get(r, r)}
        if r in unsupported:
            entry["unsupported"] = unsupported[r]
        if r in offloads:
            entry["offloads"] = offloads[r]
        wl = {}
        for key, c in rows.get(r, {}).items():
            m = METRIC[key]
            d = {"unit": m.unit, "higher_is_better": m.higher_better,
                 "samples": c["samples"], "rounds": c["rounds"], "failed": c["failed"],
                 "median": c.get("median"), "min": c.get("min"), "max": c.get("max")}
            if m.vs_veth:
                d["ratio_veth"] = ratio(c.get("median"), median_of(rows, "veth", key))
            for k2, base, _ in EXTRA_RATIOS:
                if k2 == key:
                    d[f"ratio_{base}"] = ratio(c.get("median"), median_of(rows, base, key))
            wl[key] = d
        entry["workloads"] = wl
        doc["rows"][r] = entry
    return doc


def main():
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    out = Path(sys.argv[1]).resolve()
    try:
        meta, rows, unsupported = load(out)
    except OSError as e:
        print(f"table.py: cannot read the run in {out}: {e}", file=sys.stderr)
        return 1
    summarize(rows)
    targets = evaluate_targets(rows, unsupported)
    offloads = offload_state(out, rows)
    (out / "table.md").write_text(markdown(meta, rows, unsupported, targets, offloads, out),
                                  encoding="utf-8")
    (out / "table.json").write_text(
        json.dumps(json_doc(meta, rows, unsupported, targets, offloads), indent=1) + "\n",
        encoding="utf-8")
    (out / "ratios.svg").write_text(svg_chart(meta, rows, unsupported), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
