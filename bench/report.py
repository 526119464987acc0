#!/usr/bin/python3
"""The report of bench/run: medians, ratios against the targets, markdown and JSON.

  report.py --raw RAW.jsonl --out PREFIX --meta key=value ...   writes PREFIX.md and PREFIX.json
  report.py --parse-wrk WRK_OUTPUT TIMES_OUTPUT                  prints wrk's run as one JSON line

RAW.jsonl has one line per measured run: {"comparison", "side", "run", "result"}, where result
is the JSON line the program printed (`scales bench --json`, bench_thrift_peer, bench_raw_floor,
bench_alloc_count, wrk via --parse-wrk) or Google Benchmark's JSON (comparison "balancer").

Ratios are taken per round (the two sides ran back to back), then the median over rounds is
reported: a shared machine's drift between rounds cancels out of each ratio.
"""
import argparse
import json
import re
import statistics
import sys


def parse_wrk(out_path, times_path):
    text = open(out_path).read()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", text)
    requests = int(m.group(1))
    unit = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[m.group(3)]
    elapsed = float(m.group(2)) * unit

    def us(s):
        v, u = re.match(r"([\d.]+)(\w+)", s).groups()
        return float(v) * {"us": 1, "ms": 1e3, "s": 1e6}[u]

    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", text, re.M))
    errors = 0
    for pat in (r"Non-2xx or 3xx responses: (\d+)", r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"):
        m = re.search(pat, text)
        if m:
            errors += sum(int(g) for g in m.groups())
    # bash `times`: line 1 the subshell, line 2 its children (wrk).
    child = open(times_path).read().split("\n")[1].split()

    def secs(t):
        mm, ss = re.match(r"(\d+)m([\d.]+)s", t).groups()
        return int(mm) * 60 + float(ss)

    cpu = secs(child[0]) + secs(child[1])
    print(json.dumps({
        "requests": requests, "failed": errors, "throughput_rps": rps, "elapsed_s": elapsed,
        "latency_us": {"p50": us(lat["50"]), "p99": us(lat["99"])}, "cpu_s": cpu,
        "cpu_us_per_call": cpu * 1e6 / requests if requests else 0}))


def median(xs):
    return statistics.median(xs) if xs else None


# (comparison, scales side, peer side, metric, kind, target, label)
# kind: "ge" ratio >= target, "le" ratio <= target, "diff_le" scales - peer <= target;
# "ratio" and "diff" (target None): reported only.
RATIO_TARGETS = []
for c in (1, 16, 64):
    RATIO_TARGETS.append((f"http_c{c}", "scales", "wrk", "throughput_rps", "ge", 0.9,
                          f"HTTP {c} conn: throughput vs wrk -t1"))
    RATIO_TARGETS.append((f"http_c{c}", "scales", "wrk", "cpu_us_per_call", "le", 1.2,
                          f"HTTP {c} conn: client CPU/call vs wrk"))
RATIO_TARGETS += [
    ("thrift_c1", "scales", "apache", "throughput_rps", "ge", 1.0, "Thrift framed 1 outstanding: throughput vs Apache Thrift"),
    ("thrift_c1", "scales", "apache", "p50_us", "diff_le", 5.0, "Thrift framed 1 outstanding: p50 latency - Apache Thrift's (us)"),
    ("thrift_c1", "scales", "apache", "mean_us", "diff_le", 5.0, "Thrift framed 1 outstanding: mean latency - Apache Thrift's (us)"),
    ("thrift_c16", "scales", "apache", "throughput_rps", "ge", 1.5,
     "Thrift framed 16 callers, TThreadedServer: throughput vs Apache Thrift threads"),
    ("thrift_c64", "scales", "apache", "throughput_rps", "ge", 1.5,
     "Thrift framed 64 callers, TThreadedServer: throughput vs Apache Thrift threads"),
    ("thrift_nb_c16", "scales", "apache", "throughput_rps", "ge", 1.5,
     "Thrift framed 16 callers, TNonblockingServer: throughput vs Apache Thrift threads"),
    ("thrift_nb_c64", "scales", "apache", "throughput_rps", "ge", 1.5,
     "Thrift framed 64 callers, TNonblockingServer: throughput vs Apache Thrift threads"),
]
# What TThreadedServer allows at best with many callers: bench_raw_floor pipelining N calls on
# one connection, so the server's thread never sleeps between them (no client in the
# comparisons pipelines; the server answers them in order). Reported.
for c in (16, 64):
    RATIO_TARGETS.append((f"thrift_c{c}", "raw_pipelined", "apache", "throughput_rps", "ratio", None,
                          f"Thrift framed {c} callers, TThreadedServer: raw socket pipelining {c} on one "
                          "connection vs Apache Thrift threads"))
RATIO_TARGETS += [
    ("thriftmux_c64", "scales", "apache", "throughput_rps", "ge", 2.0, "ThriftMux 64 outstanding (1 session) vs Apache Thrift 64 threads"),
    ("thriftmux_c64", "scales", "raw_floor", "cpu_us_per_call", "le", 1.5, "ThriftMux 64 outstanding: client CPU/call vs raw-socket floor"),
    ("event_loops", "loops2", "loops1", "throughput_rps", "ge", 1.0, "2 event loops vs 1 (server on 1 core): throughput"),
    ("event_loops_pinned", "loops2", "loops1", "throughput_rps", "ratio", None,
     "2 event loops vs 1, server on core 0 and client on core 1: throughput"),
    # Busy polling (RuntimeOptions::busy_poll, bench_raw_floor --busy-poll-us): reported, not
    # targets (the targets are for the default client; docs/PERFORMANCE.md, "Busy polling").
    ("thrift_c1", "scales_busy", "apache", "throughput_rps", "ratio", None,
     "Thrift framed 1 outstanding, scales busy-polling: throughput vs Apache Thrift"),
    ("thrift_c1", "scales_busy", "apache", "p50_us", "diff", None,
     "Thrift framed 1 outstanding, scales busy-polling: p50 latency - Apache Thrift's (us)"),
    ("thrift_c1", "scales_busy", "raw_floor_busy", "throughput_rps", "ratio", None,
     "Thrift framed 1 outstanding, both busy-polling: throughput vs raw-socket floor"),
    ("thriftmux_c64", "scales_busy", "apache", "throughput_rps", "ratio", None,
     "ThriftMux 64 outstanding, scales busy-polling: throughput vs Apache Thrift 64 threads"),
    ("thriftmux_c64", "scales_busy", "raw_floor_busy", "cpu_us_per_call", "ratio", None,
     "ThriftMux 64 outstanding, both busy-polling: client CPU/call vs raw-socket floor"),
    ("thriftmux_c64", "scales_busy", "raw_floor_busy", "throughput_rps", "ratio", None,
     "ThriftMux 64 outstanding, both busy-polling: throughput vs raw-socket floor"),
]


def metric(result, name):
    if name == "p50_us":
        return result["latency_us"]["p50"]
    if name == "mean_us":  # closed loop, one outstanding: elapsed / calls
        return result["elapsed_s"] * 1e6 / result["requests"] if result["requests"] else None
    return result.get(name)


def verdict(kind, value, target):
    if value is None:
        return "n/a", ""
    ok = value >= target if kind == "ge" else value <= target
    if ok:
        return "met", ""
    if kind == "ge":
        return "MISSED", f"{(1 - value / target) * 100:.0f}% short"
    if kind == "le":
        return "MISSED", f"{(value / target - 1) * 100:.0f}% over"
    return "MISSED", f"{value - target:.1f} us over"


def fmt(v, digits=2):
    if v is None:
        return "n/a"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def report(args):
    rows = [json.loads(l) for l in open(args.raw) if l.strip()]
    meta = dict(m.split("=", 1) for m in args.meta)
    by = {}
    for r in rows:
        by.setdefault((r["comparison"], r["side"]), {})[r["run"]] = r["result"]

    # Figures: medians per comparison and side.
    figures = []
    for (comp, side), runs in sorted(by.items()):
        if comp in ("memory", "balancer"):
            continue
        res = list(runs.values())
        figures.append({
            "comparison": comp, "side": side, "runs": len(res),
            "throughput_rps": median([r["throughput_rps"] for r in res]),
            "p50_us": median([r["latency_us"]["p50"] for r in res]),
            "p99_us": median([r["latency_us"]["p99"] for r in res]),
            "cpu_us_per_call": median([r["cpu_us_per_call"] for r in res]),
            "failed": sum(r.get("failed", 0) for r in res),
        })

    targets = []
    for comp, a, b, name, kind, target, label in RATIO_TARGETS:
        ra, rb = by.get((comp, a), {}), by.get((comp, b), {})
        per_round = []
        for run in sorted(set(ra) & set(rb)):
            va, vb = metric(ra[run], name), metric(rb[run], name)
            if va is None or vb is None:
                continue
            if kind in ("diff_le", "diff"):
                per_round.append(va - vb)
            elif vb:
                per_round.append(va / vb)
        value = median(per_round)
        if target is None:
            if not per_round:
                continue  # a run without that side (an older raw file)
            targets.append({"label": label, "comparison": comp, "metric": name, "value": value,
                            "target": "report", "status": "", "miss": "", "per_round": per_round})
            continue
        status, miss = verdict(kind, value, target)
        targets.append({"label": label, "comparison": comp, "metric": name, "value": value,
                        "target": ("<= +" if kind == "diff_le" else (">= " if kind == "ge" else "<= ")) + f"{target:g}",
                        "status": status, "miss": miss, "per_round": per_round})

    mem = by.get(("memory", "scales"), {}).get(1)
    if mem:
        for key, target, label in (
                ("allocs_per_call_c64", 4, "heap allocations per ThriftMux call (64 outstanding)"),
                ("allocs_per_call_c1", 4, "heap allocations per ThriftMux call (1 outstanding)"),
                ("bytes_per_outstanding", 2048, "heap bytes per outstanding ThriftMux request"),
                ("bytes_per_idle_thrift_conn", 16384, "heap bytes per idle pooled Thrift connection"),
                ("bytes_per_idle_mux_session", 16384, "heap bytes per idle Mux connection (session)")):
            status, miss = verdict("le", mem.get(key), target)
            targets.append({"label": label, "comparison": "memory", "metric": key, "value": mem.get(key),
                            "target": f"<= {target:g}", "status": status, "miss": miss})
        # A whole client per connection: reported, not a target (a client is not a connection).
        targets.append({"label": "heap bytes per idle ThriftMux client (1 session; whole client)",
                        "comparison": "memory", "metric": "bytes_per_idle_mux_client",
                        "value": mem.get("bytes_per_idle_mux_client"), "target": "report", "status": "",
                        "miss": ""})

    bal = by.get(("balancer", "scales"), {}).get(1)
    picks = {}
    if bal:
        for b in bal["benchmarks"]:
            m = re.match(r"BM_Pick/(\w+)/(\d+)", b["name"])
            if m and b.get("run_type", "iteration") == "iteration":
                picks.setdefault(m.group(1), {})[int(m.group(2))] = b["cpu_time"]  # ns
        for kind, t in sorted(picks.items()):
            if 10 in t and 10000 in t:
                value = t[10000] / t[10]
                status, miss = verdict("le", value, 2.0)
                targets.append({"label": f"balancer {kind}: cost per request at 10,000 vs 10 nodes "
                                         f"({t[10]:.0f} ns vs {t[10000]:.0f} ns)",
                                "comparison": "balancer", "metric": kind, "value": value, "target": "<= 2",
                                "status": status, "miss": miss})

    out = {"meta": meta, "targets": targets, "figures": figures, "memory": mem, "balancer_ns": picks}
    with open(args.out + ".json", "w") as f:
        json.dump(out, f, indent=1)

    md = [f"# scales benchmark, {meta.get('date', '')}", ""]
    md.append(f"Machine: {meta.get('nproc')} cores, {meta.get('cpu')}, {meta.get('kernel')}; "
              f"load average at start {meta.get('loadavg')}. Commit {meta.get('commit')}.")
    md.append(f"Peers: nginx {meta.get('nginx')}, {meta.get('wrk')}, Apache Thrift {meta.get('apache_thrift')}.")
    md.append(f"Runs: {meta.get('runs')} alternating rounds of {meta.get('duration_s')} s per side"
              f"{' (--quick: a smoke test, not a measurement)' if meta.get('quick') == '1' else ''}; "
              "ratios are the median of the per-round ratios.")
    md += ["", "## Targets", "", "| comparison | median | target | result |", "| --- | --- | --- | --- |"]
    for t in targets:
        md.append(f"| {t['label']} | {fmt(t['value'])} | {t['target']} | {t['status']} {t['miss']} |")
    md += ["", "## Figures (medians)", "",
           "| comparison | client | throughput (req/s) | p50 (us) | p99 (us) | client CPU/call (us) | failed |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for f in figures:
        md.append(f"| {f['comparison']} | {f['side']} | {fmt(f['throughput_rps'], 0)} | {fmt(f['p50_us'], 0)} | "
                  f"{fmt(f['p99_us'], 0)} | {fmt(f['cpu_us_per_call'])} | {f['failed']} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(md) + "\n")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--parse-wrk", nargs=2)
    p.add_argument("--raw")
    p.add_argument("--out")
    p.add_argument("--meta", action="append", default=[])
    args = p.parse_args()
    if args.parse_wrk:
        parse_wrk(*args.parse_wrk)
    elif args.raw and args.out:
        report(args)
    else:
        p.error("give --parse-wrk or --raw and --out")


if __name__ == "__main__":
    sys.exit(main())
