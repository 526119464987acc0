#!/usr/bin/python3
"""The report of bench/run: medians, ratios against the targets, markdown and JSON.

  report.py --raw RAW.jsonl --out PREFIX --meta key=value ...   writes PREFIX.md and PREFIX.json
  report.py --parse-wrk WRK_OUTPUT TIMES_OUTPUT                  prints wrk's run as one JSON line
  report.py --check-line < LINE                                  prints a result line's failed calls

RAW.jsonl has one line per measured run: {"comparison", "side", "run", "seq", "exit", "result"},
where result is the JSON line the program printed (`scales bench --json`, bench_thrift_peer,
bench_raw_floor, bench_alloc_count, wrk via --parse-wrk) or Google Benchmark's JSON (comparison
"balancer"), seq the run's place in the whole sequence and exit the program's exit status (seq
and exit are absent from older raw files).

Ratios are taken per round (the two sides ran back to back), then the median over rounds is
reported: a shared machine's drift between rounds cancels out of each ratio.

One rule for failures: a run with a failed call (`failed` > 0, wrk's non-2xx responses and
socket errors included), with no calls at all (`requests` 0) or a non-zero exit status is
invalid. An invalid run is left out of the figures and of every ratio of its round, and listed
under "Invalid runs"; a balancer benchmark that errored (or reports no CPU time) is a "n/a
(error: ...)" row, never met. Either makes the exit status INVALID_EXIT (3), after both files
are written; bench/run then fails.
"""
import argparse
import json
import math
import re
import statistics
import sys

INVALID_EXIT = 3


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
    # bash `times`: line 1 the subshell, line 2 its children (wrk, under timeout). Unlike the
    # other programs' getrusage over the measured interval, this includes wrk's start-up and
    # teardown (docs/PERFORMANCE.md).
    child = open(times_path).read().split("\n")[1].split()

    def secs(t):
        mm, ss = re.match(r"(\d+)m([\d.]+)s", t).groups()
        return int(mm) * 60 + float(ss)

    cpu = secs(child[0]) + secs(child[1])
    print(json.dumps({
        "requests": requests, "failed": errors, "throughput_rps": rps, "elapsed_s": elapsed,
        "latency_us": {"p50": us(lat["50"]), "p99": us(lat["99"])}, "cpu_s": cpu,
        "cpu_us_per_call": cpu * 1e6 / requests if requests else 0}))


def check_line(text):
    """For bench/run: the failed calls of one result line; exit status 2 if it is none."""
    try:
        result = json.loads(text)
    except ValueError:
        result = None
    if not isinstance(result, dict):
        print("not a JSON result line: " + text.strip()[:200], file=sys.stderr)
        return 2
    print(int(result.get("failed", 0) or 0))
    return 0


def median(xs):
    return statistics.median(xs) if xs else None


# The log-linear buckets of scales' latency histogram (include/scales/stats/stats.h,
# src/stats/stats.cc: 16 exact buckets, then 16 linear sub-buckets per power of two up to
# 2^40). `scales bench` reports a percentile as the upper bound of the bucket holding it, the
# peers an exact sample; comparing those would favour the peer by up to a bucket's width
# (6.25 %), so the p50 comparisons put both sides through the same function.
_SUB_BUCKET_BITS = 4
_MAX_EXPONENT = 40
_INT64_MAX = (1 << 63) - 1


def bucket_upper_bound(value):
    v = max(0, int(math.ceil(value)))
    if v < (1 << _SUB_BUCKET_BITS):
        return v
    e = v.bit_length() - 1
    if e > _MAX_EXPONENT:
        return _INT64_MAX
    sub = (v >> (e - _SUB_BUCKET_BITS)) & ((1 << _SUB_BUCKET_BITS) - 1)
    return (((1 << _SUB_BUCKET_BITS) + sub + 1) << (e - _SUB_BUCKET_BITS)) - 1


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
    ("thrift_c1", "scales", "apache", "p50_bucket_us", "diff_le", 5.0,
     "Thrift framed 1 outstanding: p50 latency - Apache Thrift's (us, both as histogram bucket bounds)"),
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
     "2 event loops vs 1, server on one core and client on another: throughput"),
    # Busy polling (RuntimeOptions::busy_poll, bench_raw_floor --busy-poll-us): reported, not
    # targets (the targets are for the default client; docs/PERFORMANCE.md, "Busy polling").
    ("thrift_c1", "scales_busy", "apache", "throughput_rps", "ratio", None,
     "Thrift framed 1 outstanding, scales busy-polling: throughput vs Apache Thrift"),
    ("thrift_c1", "scales_busy", "apache", "p50_bucket_us", "diff", None,
     "Thrift framed 1 outstanding, scales busy-polling: p50 latency - Apache Thrift's (us, both as histogram bucket bounds)"),
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
    if name == "p50_bucket_us":
        return bucket_upper_bound(result["latency_us"]["p50"])
    if name == "mean_us":  # closed loop, one outstanding: elapsed / calls
        return result["elapsed_s"] * 1e6 / result["requests"] if result["requests"] else None
    return result.get(name)


def invalid_reason(row):
    """Why a measured run cannot be used (failed calls, no calls, a non-zero exit), or None."""
    why = []
    failed = row["result"].get("failed", 0) or 0
    if failed > 0:
        why.append(f"{failed:,} failed calls")
    elif "requests" in row["result"] and not row["result"]["requests"]:
        why.append("no calls made")  # 0 req/s and 0 us of CPU per call: nothing was measured
    if row.get("exit", 0) != 0:
        why.append(f"exit status {row['exit']}")
    return ", ".join(why) or None


def verdict(kind, value, target):
    if value is None:
        return "n/a", ""
    ok = value >= target if kind == "ge" else value <= target
    if ok:
        return "met", ""
    if kind == "ge":
        return "MISSED", f"{_amount((1 - value / target) * 100, 0)}% short"
    if kind == "le":
        return "MISSED", f"{_amount((value / target - 1) * 100, 0)}% over"
    return "MISSED", f"{_amount(value - target, 1)} us over"


def _amount(x, digits):
    """x with `digits` decimals, or two significant digits where those would show a miss as 0."""
    return f"{x:.{digits}f}" if x >= 10 ** -digits else f"{x:.2g}"


def fmt(v, digits=2):
    if v is None:
        return "n/a"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def balancer_rows(bal, invalid):
    """Target rows for Google Benchmark's BM_Pick/<kind>/<nodes>, and the valid CPU times."""
    picks, errors, rows = {}, {}, []
    for b in bal.get("benchmarks", []):
        m = re.match(r"BM_Pick/(\w+)/(\d+)", b.get("name", ""))
        if not m or b.get("run_type", "iteration") != "iteration":
            continue
        kind, nodes = m.group(1), int(m.group(2))
        cpu = b.get("cpu_time") or 0
        if b.get("error_occurred") or b.get("skipped"):
            errors.setdefault(kind, {})[nodes] = (b.get("error_message") or b.get("skip_message")
                                                  or "skipped")
        elif cpu <= 0:
            errors.setdefault(kind, {})[nodes] = "no CPU time measured"
        else:
            picks.setdefault(kind, {})[nodes] = cpu  # ns
    for kind in sorted(set(picks) | set(errors)):
        t, err = picks.get(kind, {}), dict(errors.get(kind, {}))
        for nodes in (10, 10000):
            if nodes not in t and nodes not in err:
                err[nodes] = "not run"
        row = {"comparison": "balancer", "metric": kind, "target": "<= 2"}
        if err:
            why = "; ".join(f"{n:,} nodes: {e}" for n, e in sorted(err.items()))
            row.update(label=f"balancer {kind}: cost per request at 10,000 vs 10 nodes", value=None,
                       status="n/a", miss=f"(error: {why})")
            invalid.append({"comparison": "balancer", "side": kind, "run": 1, "why": why})
        else:
            value = t[10000] / t[10]
            status, miss = verdict("le", value, 2.0)
            row.update(label=f"balancer {kind}: cost per request at 10,000 vs 10 nodes "
                             f"({t[10000]:.0f} ns vs {t[10]:.0f} ns)",
                       value=value, status=status, miss=miss)
        rows.append(row)
    return rows, picks


def report(args):
    rows = [json.loads(l) for l in open(args.raw) if l.strip()]
    meta = dict(m.split("=", 1) for m in args.meta)
    by = {}
    for r in rows:
        by.setdefault((r["comparison"], r["side"]), {})[r["run"]] = r

    # Invalid runs (failed calls, a non-zero exit): out of the figures and the ratios.
    invalid = []
    bad = {}
    for (comp, side), runs in sorted(by.items()):
        if comp == "balancer":
            continue
        for run, r in sorted(runs.items()):
            why = invalid_reason(r)
            if why:
                bad[(comp, side, run)] = why
                invalid.append({"comparison": comp, "side": side, "run": run, "why": why})

    # Figures: medians per comparison and side, over its valid runs.
    figures = []
    for (comp, side), runs in sorted(by.items()):
        if comp in ("memory", "balancer"):
            continue
        res = [r["result"] for run, r in sorted(runs.items()) if (comp, side, run) not in bad]
        figures.append({
            "comparison": comp, "side": side, "runs": len(res), "invalid_runs": len(runs) - len(res),
            "throughput_rps": median([r["throughput_rps"] for r in res]),
            "p50_us": median([r["latency_us"]["p50"] for r in res]),
            "p99_us": median([r["latency_us"]["p99"] for r in res]),
            "cpu_us_per_call": median([r["cpu_us_per_call"] for r in res]),
            "failed": sum(r["result"].get("failed", 0) or 0 for r in runs.values()),
        })

    targets = []
    for comp, a, b, name, kind, target, label in RATIO_TARGETS:
        ra, rb = by.get((comp, a), {}), by.get((comp, b), {})
        rounds = sorted(set(ra) & set(rb))
        if not rounds:
            continue  # a run without that side (an older raw file, one CPU)
        per_round, excluded, apart = [], [], []
        for run in rounds:
            why = [f"{s}: {bad[(comp, s, run)]}" for s in (a, b) if (comp, s, run) in bad]
            if why:
                excluded.append({"run": run, "why": "; ".join(why)})
                continue
            if "seq" in ra[run] and "seq" in rb[run] and abs(ra[run]["seq"] - rb[run]["seq"]) != 1:
                apart.append(run)
            va, vb = metric(ra[run]["result"], name), metric(rb[run]["result"], name)
            if va is None or vb is None:
                continue
            if kind in ("diff_le", "diff"):
                per_round.append(va - vb)
            elif vb:
                per_round.append(va / vb)
        value = median(per_round)
        t = {"label": label, "comparison": comp, "metric": name, "value": value,
             "per_round": per_round, "invalid_rounds": excluded, "not_back_to_back": apart}
        if target is None:
            t.update(target="report", status="", miss="")
        else:
            status, miss = verdict(kind, value, target)
            t.update(target=("<= +" if kind == "diff_le" else (">= " if kind == "ge" else "<= ")) + f"{target:g}",
                     status=status, miss=miss)
        if excluded:
            left = f"{len(excluded)} of {len(rounds)} rounds invalid"
            t["miss"] = (t["miss"] + "; " if t["miss"] else "") + (
                f"({left}, left out)" if per_round else f"(every round invalid)")
            if not per_round:
                t["status"] = "n/a"
        targets.append(t)

    mem_row = by.get(("memory", "scales"), {}).get(1)
    mem = mem_row["result"] if mem_row and ("memory", "scales", 1) not in bad else None
    if mem_row:
        for key, target, label in (
                ("allocs_per_call_c64", 4, "heap allocations per ThriftMux call (64 outstanding)"),
                ("allocs_per_call_c1", 4, "heap allocations per ThriftMux call (1 outstanding)"),
                ("bytes_per_outstanding", 2048, "heap bytes per outstanding ThriftMux request"),
                ("bytes_per_idle_thrift_conn", 16384, "heap bytes per idle pooled Thrift connection"),
                ("bytes_per_idle_mux_session", 16384, "heap bytes per idle Mux connection (session)")):
            value = mem.get(key) if mem else None
            status, miss = verdict("le", value, target)
            targets.append({"label": label, "comparison": "memory", "metric": key, "value": value,
                            "target": f"<= {target:g}", "status": status,
                            "miss": miss if mem else "(invalid run)"})
        # A whole client per connection: reported, not a target (a client is not a connection).
        targets.append({"label": "heap bytes per idle ThriftMux client (1 session; whole client)",
                        "comparison": "memory", "metric": "bytes_per_idle_mux_client",
                        "value": mem.get("bytes_per_idle_mux_client") if mem else None,
                        "target": "report", "status": "", "miss": ""})

    bal = by.get(("balancer", "scales"), {}).get(1)
    picks = {}
    if bal:
        bal_rows, picks = balancer_rows(bal["result"], invalid)
        targets += bal_rows

    apart_any = [t["label"] for t in targets if t.get("not_back_to_back")]
    out = {"meta": meta, "valid": not invalid, "invalid_runs": invalid, "targets": targets,
           "figures": figures, "memory": mem, "balancer_ns": picks}
    with open(args.out + ".json", "w") as f:
        json.dump(out, f, indent=1)

    md = [f"# scales benchmark, {meta.get('date', '')}", ""]
    if invalid:
        md += [f"**INVALID: {len(invalid)} run(s) failed (below, \"Invalid runs\"); they are left out "
               "of the figures and ratios, and bench/run exits with an error.**", ""]
    md.append(f"Machine: {meta.get('nproc')} cores, {meta.get('cpu')}, {meta.get('kernel')}; "
              f"load average at start {meta.get('loadavg')}. Commit {meta.get('commit')}.")
    md.append(f"Peers: nginx {meta.get('nginx')}, {meta.get('wrk')}, Apache Thrift {meta.get('apache_thrift')}.")
    md.append(f"Runs: {meta.get('runs')} rounds of {meta.get('duration_s')} s per side, the order "
              "reversed every other round"
              f"{' (--quick: a smoke test, not a measurement)' if meta.get('quick') == '1' else ''}; "
              "ratios are the median of the per-round ratios of two runs made back to back. "
              "p50 differences compare both sides as the upper bounds of scales' log-linear "
              "histogram buckets.")
    if apart_any:
        md += ["", "Not back to back in some rounds (an older or hand-made raw file): " + "; ".join(apart_any) + "."]
    md += ["", "## Targets", "", "| comparison | median | target | result |", "| --- | --- | --- | --- |"]
    for t in targets:
        md.append(f"| {t['label']} | {fmt(t['value'])} | {t['target']} | {t['status']} {t['miss']} |")
    md += ["", "## Figures (medians of the valid runs)", "",
           "| comparison | client | throughput (req/s) | p50 (us) | p99 (us) | client CPU/call (us) | failed calls | invalid runs |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for f in figures:
        md.append(f"| {f['comparison']} | {f['side']} | {fmt(f['throughput_rps'], 0)} | {fmt(f['p50_us'], 0)} | "
                  f"{fmt(f['p99_us'], 0)} | {fmt(f['cpu_us_per_call'])} | {f['failed']} | {f['invalid_runs']} |")
    if invalid:
        md += ["", "## Invalid runs", "", "| comparison | side | round | why |", "| --- | --- | --- | --- |"]
        for i in invalid:
            md.append(f"| {i['comparison']} | {i['side']} | {i['run']} | {i['why']} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(md) + "\n")

    for i in invalid:
        print(f"report.py: invalid: {i['comparison']}/{i['side']} round {i['run']}: {i['why']}", file=sys.stderr)
    return INVALID_EXIT if invalid else 0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--parse-wrk", nargs=2)
    p.add_argument("--check-line", action="store_true")
    p.add_argument("--raw")
    p.add_argument("--out")
    p.add_argument("--meta", action="append", default=[])
    args = p.parse_args()
    if args.parse_wrk:
        parse_wrk(*args.parse_wrk)
        return 0
    if args.check_line:
        return check_line(sys.stdin.read())
    if args.raw and args.out:
        return report(args)
    p.error("give --parse-wrk, --check-line, or --raw and --out")


if __name__ == "__main__":
    sys.exit(main())
