#!/usr/bin/python3
"""Tests of bench/report.py on synthetic raw files: balancer errors, failed runs and runs
without calls, the p50 bucketing, the balancer label, how much a target is missed by, wrk
parsing and the back-to-back check.

  /usr/bin/python3 bench/test_report.py        (exit status 0 when every test passes)
"""
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
REPORT = os.path.join(HERE, "report.py")
spec = importlib.util.spec_from_file_location("report", REPORT)
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)


def result(rps=1000.0, p50=100, p99=200, cpu=10.0, failed=0, requests=3000, elapsed=3.0):
    return {"requests": requests, "failed": failed, "throughput_rps": rps, "elapsed_s": elapsed,
            "latency_us": {"p50": p50, "p99": p99}, "cpu_us_per_call": cpu}


def bench_entry(kind, nodes, cpu, **extra):
    e = {"name": f"BM_Pick/{kind}/{nodes}", "run_type": "iteration", "iterations": 1000,
         "real_time": cpu, "cpu_time": cpu, "time_unit": "ns"}
    e.update(extra)
    return e


class ReportRun:
    """Writes a raw file, runs report.py on it as bench/run does, reads the outputs."""

    def __init__(self, lines):
        self.dir = tempfile.TemporaryDirectory()
        raw = os.path.join(self.dir.name, "raw.jsonl")
        with open(raw, "w") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")
        out = os.path.join(self.dir.name, "out")
        p = subprocess.run([sys.executable, REPORT, "--raw", raw, "--out", out, "--meta", "quick=1"],
                           capture_output=True, text=True)
        self.returncode, self.stderr = p.returncode, p.stderr
        if os.path.exists(out + ".json"):
            with open(out + ".json") as f:
                self.json = json.load(f)
            with open(out + ".md") as f:
                self.md = f.read()
        self.dir.cleanup()

    def target(self, label_start):
        rows = [t for t in self.json["targets"] if t["label"].startswith(label_start)]
        assert len(rows) == 1, (label_start, [t["label"] for t in self.json["targets"]])
        return rows[0]


def row(comparison, side, run, res, seq=None, exit=0):
    r = {"comparison": comparison, "side": side, "run": run, "exit": exit, "result": res}
    if seq is not None:
        r["seq"] = seq
    return r


def balancer(entries):
    return row("balancer", "scales", 1, {"context": {}, "benchmarks": entries})


class BalancerTest(unittest.TestCase):
    def test_valid_ratio_and_label_order(self):
        r = ReportRun([balancer([bench_entry("p2c", 10, 41.0), bench_entry("p2c", 10000, 63.0)])])
        self.assertEqual(r.returncode, 0, r.stderr)
        t = r.target("balancer p2c")
        # The label gives the 10,000-node time first, as it says.
        self.assertIn("at 10,000 vs 10 nodes (63 ns vs 41 ns)", t["label"])
        self.assertAlmostEqual(t["value"], 63.0 / 41.0)
        self.assertEqual(t["status"], "met")

    def test_errored_10000_node_entry_is_not_met(self):
        r = ReportRun([balancer([
            bench_entry("aperture", 10, 35.0),
            bench_entry("aperture", 10000, 0.0, error_occurred=True, error_message="a request failed")])])
        self.assertEqual(r.returncode, report.INVALID_EXIT)
        t = r.target("balancer aperture")
        self.assertEqual(t["status"], "n/a")
        self.assertIsNone(t["value"])
        self.assertIn("error: 10,000 nodes: a request failed", t["miss"])
        self.assertFalse(r.json["valid"])
        self.assertIn("INVALID", r.md)

    def test_errored_10_node_entry_does_not_divide_by_zero(self):
        r = ReportRun([balancer([
            bench_entry("p2c", 10, 0.0, error_occurred=True, error_message="balancer did not open"),
            bench_entry("p2c", 10000, 60.0)])])
        self.assertEqual(r.returncode, report.INVALID_EXIT, r.stderr)
        self.assertNotIn("Traceback", r.stderr)
        t = r.target("balancer p2c")
        self.assertEqual(t["status"], "n/a")
        self.assertIn("10 nodes: balancer did not open", t["miss"])

    def test_zero_cpu_time_and_skipped_entries_are_errors(self):
        r = ReportRun([balancer([
            bench_entry("p2c", 10, 0.0), bench_entry("p2c", 10000, 60.0),
            bench_entry("aperture_full", 10, 50.0),
            bench_entry("aperture_full", 10000, 70.0, skipped=True, skip_message="skipped here")])])
        self.assertEqual(r.returncode, report.INVALID_EXIT)
        self.assertIn("no CPU time measured", r.target("balancer p2c")["miss"])
        self.assertIn("skipped here", r.target("balancer aperture_full")["miss"])
        self.assertNotIn("met", [t["status"] for t in r.json["targets"]])

    def test_missing_node_count_is_an_error(self):
        r = ReportRun([balancer([bench_entry("p2c", 10, 40.0)])])
        self.assertEqual(r.returncode, report.INVALID_EXIT)
        self.assertIn("10,000 nodes: not run", r.target("balancer p2c")["miss"])


class FailedRunTest(unittest.TestCase):
    def rounds(self, failed_scales_round2=0, exit_round3=0, wrk_failed_round1=0):
        lines, seq = [], 0
        for run in (1, 2, 3):
            for side in (("wrk", "scales") if run % 2 else ("scales", "wrk")):
                seq += 1
                failed = exit = 0
                if side == "scales" and run == 2:
                    failed = failed_scales_round2
                if side == "scales" and run == 3:
                    exit = exit_round3
                if side == "wrk" and run == 1:
                    failed = wrk_failed_round1
                rps = {"wrk": 1000.0, "scales": 2000.0 if run == 2 else 950.0}[side]
                lines.append(row("http_c1", side, run, result(rps=rps, failed=failed), seq=seq, exit=exit))
        return lines

    def test_all_valid(self):
        r = ReportRun(self.rounds())
        self.assertEqual(r.returncode, 0, r.stderr)
        t = r.target("HTTP 1 conn: throughput")
        self.assertEqual(t["per_round"], [0.95, 2.0, 0.95])
        self.assertEqual(t["status"], "met")
        self.assertEqual(r.json["invalid_runs"], [])
        self.assertNotIn("INVALID", r.md)

    def test_round_with_failed_calls_is_left_out_and_reported(self):
        r = ReportRun(self.rounds(failed_scales_round2=7))
        self.assertEqual(r.returncode, report.INVALID_EXIT)
        t = r.target("HTTP 1 conn: throughput")
        self.assertEqual(t["per_round"], [0.95, 0.95])  # round 2 (2.0x) left out
        self.assertEqual(t["invalid_rounds"], [{"run": 2, "why": "scales: 7 failed calls"}])
        self.assertIn("1 of 3 rounds invalid", t["miss"])
        fig = [f for f in r.json["figures"] if f["side"] == "scales"][0]
        self.assertEqual((fig["runs"], fig["invalid_runs"], fig["failed"]), (2, 1, 7))
        self.assertEqual(fig["throughput_rps"], 950.0)  # the failed run's 2000 left out
        self.assertIn("## Invalid runs", r.md)
        self.assertIn("| http_c1 | scales | 2 | 7 failed calls |", r.md)
        self.assertIn("http_c1/scales round 2: 7 failed calls", r.stderr)

    def test_wrk_errors_and_exit_status_invalidate(self):
        r = ReportRun(self.rounds(exit_round3=1, wrk_failed_round1=3))
        self.assertEqual(r.returncode, report.INVALID_EXIT)
        t = r.target("HTTP 1 conn: throughput")
        self.assertEqual(t["per_round"], [2.0])
        whys = sorted(i["why"] for i in t["invalid_rounds"])
        self.assertEqual(whys, ["scales: exit status 1", "wrk: 3 failed calls"])

    def test_every_round_invalid(self):
        lines = [row("thrift_c16", "apache", 1, result(failed=2), seq=1),
                 row("thrift_c16", "scales", 1, result(), seq=2)]
        r = ReportRun(lines)
        self.assertEqual(r.returncode, report.INVALID_EXIT)
        t = r.target("Thrift framed 16 callers, TThreadedServer: throughput")
        self.assertEqual(t["status"], "n/a")
        self.assertIsNone(t["value"])
        self.assertIn("every round invalid", t["miss"])

    def test_run_without_calls_is_invalid(self):
        # A side that made no calls (0 requests, so 0 req/s and 0 us of CPU per call) measured
        # nothing: neither a CPU ratio of 0 ("met") nor a round dropped without a word.
        lines = [row("http_c1", "wrk", 1, result(), seq=1),
                 row("http_c1", "scales", 1, result(rps=0.0, cpu=0.0, requests=0), seq=2),
                 row("http_c1", "wrk", 2, result(rps=0.0, cpu=0.0, requests=0), seq=3),
                 row("http_c1", "scales", 2, result(), seq=4)]
        r = ReportRun(lines)
        self.assertEqual(r.returncode, report.INVALID_EXIT, r.stderr)
        self.assertFalse(r.json["valid"])
        for label in ("HTTP 1 conn: client CPU/call", "HTTP 1 conn: throughput"):
            t = r.target(label)
            self.assertEqual(t["status"], "n/a", label)
            self.assertEqual(sorted(i["why"] for i in t["invalid_rounds"]),
                             ["scales: no calls made", "wrk: no calls made"], label)
        self.assertIn("| http_c1 | scales | 1 | no calls made |", r.md)

    def test_invalid_memory_run(self):
        r = ReportRun([row("memory", "scales", 1, {"allocs_per_call_c1": 1.0}, exit=2)])
        self.assertEqual(r.returncode, report.INVALID_EXIT)
        t = r.target("heap allocations per ThriftMux call (1 outstanding)")
        self.assertEqual(t["status"], "n/a")

    def test_not_back_to_back_is_flagged(self):
        lines = [row("thrift_c64", "apache", 1, result(), seq=1),
                 row("thrift_c64", "scales", 1, result(), seq=2),
                 row("thrift_c64", "raw_pipelined", 1, result(), seq=5)]
        r = ReportRun(lines)
        self.assertEqual(r.target("Thrift framed 64 callers, TThreadedServer: throughput")["not_back_to_back"], [])
        self.assertEqual(r.target("Thrift framed 64 callers, TThreadedServer: raw socket")["not_back_to_back"], [1])
        self.assertIn("Not back to back", r.md)


class VerdictTest(unittest.TestCase):
    def test_a_miss_is_never_zero(self):
        # A target missed by less than 0.5 % (or 0.05 us) is still missed by something.
        self.assertEqual(report.verdict("ge", 0.896, 0.9), ("MISSED", "0.44% short"))
        self.assertEqual(report.verdict("le", 1.203, 1.2), ("MISSED", "0.25% over"))
        self.assertEqual(report.verdict("diff_le", 5.03, 5.0), ("MISSED", "0.03 us over"))
        self.assertEqual(report.verdict("ge", 0.45, 0.9), ("MISSED", "50% short"))
        self.assertEqual(report.verdict("le", 3.4, 1.5), ("MISSED", "127% over"))
        self.assertEqual(report.verdict("diff_le", 7.25, 5.0), ("MISSED", "2.2 us over"))
        self.assertEqual(report.verdict("ge", 0.9, 0.9), ("met", ""))

    def test_near_miss_in_the_report(self):
        lines = [row("http_c1", "wrk", 1, result(rps=1000.0), seq=1),
                 row("http_c1", "scales", 1, result(rps=896.0), seq=2)]
        t = ReportRun(lines).target("HTTP 1 conn: throughput")
        self.assertEqual((t["status"], t["miss"]), ("MISSED", "0.44% short"))


class P50Test(unittest.TestCase):
    def test_bucket_upper_bound_matches_stats_h(self):
        # include/scales/stats/stats.h: exact below 16, then 16 sub-buckets per power of two;
        # "100 falls inside [100, 103]".
        cases = {0: 0, 7: 7, 15: 15, 16: 16, 31: 31, 32: 33, 33: 33, 34: 35, 64: 67, 100: 103,
                 103: 103, 104: 107, 1000: 1023, 1024: 1087, (1 << 41): (1 << 63) - 1, -5: 0}
        for v, bound in cases.items():
            self.assertEqual(report.bucket_upper_bound(v), bound, v)
        # Idempotent: a bound is its own bucket's bound (scales' reported percentiles).
        for v in range(0, 5000):
            b = report.bucket_upper_bound(v)
            self.assertEqual(report.bucket_upper_bound(b), b)
            self.assertGreaterEqual(b, v)
            self.assertLessEqual(b - v, max(1, v // 16))

    def test_p50_difference_compares_buckets(self):
        # scales reports 103 (the bound of [100, 103]); the peer's exact sample is 100: the
        # same bucket, no difference.
        lines = [row("thrift_c1", "apache", 1, result(p50=100), seq=1),
                 row("thrift_c1", "scales", 1, result(p50=103), seq=2)]
        r = ReportRun(lines)
        t = r.target("Thrift framed 1 outstanding: p50 latency")
        self.assertEqual(t["per_round"], [0])
        self.assertIn("bucket", t["label"])


class ParseWrkTest(unittest.TestCase):
    WRK = """Running 1s test @ http://127.0.0.1:1234/
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    70.00us   20.00us   1.00ms   90.00%
  Latency Distribution
     50%   67.00us
     75%   80.00us
     90%   90.00us
     99%    1.20ms
  230000 requests in 1.00s, 30.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec: 229000.00
Transfer/sec:     30.00MB
"""

    def test_failures_are_counted(self):
        with tempfile.TemporaryDirectory() as d:
            out, times = os.path.join(d, "wrk.out"), os.path.join(d, "wrk.times")
            with open(out, "w") as f:
                f.write(self.WRK)
            with open(times, "w") as f:
                f.write("0m0.001s 0m0.002s\n0m0.400s 0m0.600s\n")
            p = subprocess.run([sys.executable, REPORT, "--parse-wrk", out, times],
                               capture_output=True, text=True, check=True)
        r = json.loads(p.stdout)
        self.assertEqual(r["failed"], 7)
        self.assertEqual(r["requests"], 230000)
        self.assertEqual(r["latency_us"], {"p50": 67.0, "p99": 1200.0})
        self.assertAlmostEqual(r["cpu_us_per_call"], 1e6 / 230000)

    def test_check_line(self):
        def check(text):
            return subprocess.run([sys.executable, REPORT, "--check-line"], input=text,
                                  capture_output=True, text=True)
        p = check('{"requests": 5, "failed": 2}\n')
        self.assertEqual((p.returncode, p.stdout.strip()), (0, "2"))
        self.assertEqual(check('{"allocs_per_call_c1": 1.0}').stdout.strip(), "0")
        self.assertEqual(check("").returncode, 2)
        self.assertEqual(check("terminate called after throwing").returncode, 2)


if __name__ == "__main__":
    unittest.main()
