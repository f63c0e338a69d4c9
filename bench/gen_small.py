#!/usr/bin/env python3
"""Writes N random files of 1-16 KiB in nested directories (seeded): PER_DIR
files (default 100) in each leaf directory, ten leaves per top directory."""
import os, random, sys

root, count = sys.argv[1], int(sys.argv[2])
per_dir = int(sys.argv[3]) if len(sys.argv) > 3 else 100
rng = random.Random(42)
for i in range(count):
    d = os.path.join(root, f"d{i // (per_dir * 10):03}", f"s{(i // per_dir) % 10}")
    if i % per_dir == 0:
        os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:06}.bin"), "wb") as f:
        f.write(rng.randbytes(rng.randint(1024, 16384)))
