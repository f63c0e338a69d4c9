#!/usr/bin/env python3
"""Turns bench/s3.sh's raw figures into docs/benchmarks/s3.md.

Usage: report_s3.py RESULTS.tsv BIG_MB SMALL DIRS
RESULTS.tsv rows: case, tool, round, seconds, requests (tern's nochange only).
"""
import statistics
import sys
from collections import defaultdict
from datetime import datetime, timezone

results, big_mb, small, dirs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
times = defaultdict(list)
requests = []
for line in open(results):
    case, tool, _round, secs, req = (line.rstrip("\n").split("\t") + [""])[:5]
    times[(case, tool)].append(float(secs))
    if req:
        requests.append(int(req))

describe = {
    "big-up": f"a {big_mb} MiB file up",
    "big-down": "the same object down",
    "small-up": f"{small:,} files of 1-16 KiB in {dirs} directories up",
    "small-down": "the same tree down",
    "nochange": "a sync of the tree with nothing to send",
}
# (case, peer, the goal for tern's time / the peer's, as the issue puts it)
goals = [
    ("big-up", "aws", 0.5, "big file up: ≥ 2× the AWS CLI"),
    ("big-down", "aws", 0.5, "big file down: ≥ 2× the AWS CLI"),
    ("big-up", "rclone", 1 / 1.5, "big file up: ≥ 1.5× rclone"),
    ("big-down", "rclone", 1 / 1.5, "big file down: ≥ 1.5× rclone"),
    ("small-up", "rclone", 0.5, "small files up: ≤ 0.5× rclone's time"),
    ("small-down", "rclone", 0.5, "small files down: ≤ 0.5× rclone's time"),
]


def med(case, tool):
    v = times.get((case, tool))
    return statistics.median(v) if v else None


def cell(case, tool):
    t = med(case, tool)
    if t is None:
        return "–"
    if case.startswith("big"):
        return f"{t:.2f} s ({(big_mb << 20) / t / 1e6:,.0f} MB/s)"
    return f"{t:.2f} s"


def ratio(case, peer):
    a, b = med(case, "tern"), med(case, peer)
    return f"{a / b:.2f}" if a and b else "–"


rounds = max(len(v) for v in times.values())
print("# S3 benchmark")
print()
print(
    f"`bench/s3.sh`, {datetime.now(timezone.utc):%Y-%m-%d}: tern, the AWS CLI and rclone against one "
    "`rclone serve s3` on 127.0.0.1 over tmpfs (credentials checked), tools alternating in a seeded order "
    f"each round. Medians of {rounds} rounds; ratios are tern's time over the other's (below 1: tern is "
    "faster). Downloads are checked byte for byte after each run."
)
print()
print("| case | tern | aws | rclone | tern / aws | tern / rclone |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for case in ["big-up", "big-down", "small-up", "small-down", "nochange"]:
    if not any(k[0] == case for k in times):
        continue
    print(
        f"| {case}: {describe[case]} | {cell(case, 'tern')} | {cell(case, 'aws')} | {cell(case, 'rclone')} "
        f"| {ratio(case, 'aws')} | {ratio(case, 'rclone')} |"
    )
print()
print("| goal (issue 16) | measured | met |")
print("| --- | ---: | --- |")
for case, peer, goal, text in goals:
    a, b = med(case, "tern"), med(case, peer)
    if not (a and b):
        continue
    print(f"| {text} | {a / b:.2f} (≤ {goal:.2f}) | {'yes' if a / b <= goal else 'no'} |")
if requests:
    most = max(requests)
    # Listing pages of 1,000 keys, the roots' stats and the connection
    # check: anything per object would be thousands.
    bound = small // 1000 + 12
    print(
        f"| a no-change sync with no per-object request | {most} requests for {small:,} objects "
        f"in {dirs} directories (≤ {bound}) | {'yes' if most <= bound else 'no'} |"
    )
