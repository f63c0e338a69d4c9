#!/usr/bin/env python3
"""Watches a destination tree while tern writes it: every regular file at a
final name (not one of tern's `*.tern.*` side files) must have exactly the
content of the same path under the source, at every moment it is seen.

Usage: watch_final.py SRC DST STOPFILE
Scans DST again and again until STOPFILE exists, then scans once more.
A file is read again only when its inode, size or mtime changed since it
was last found right. Prints each wrong file and exits 1 if there was one;
prints the number of scans and files checked on success.
"""
import hashlib
import os
import sys
import time


def digest(path):
    h = hashlib.blake2b()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                return h.digest()
            h.update(b)


def main():
    src, dst, stop = sys.argv[1:4]
    want = {}
    seen = {}
    wrong = set()
    scans = checked = 0
    while True:
        last = os.path.exists(stop)
        scans += 1
        for root, _, files in os.walk(dst):
            for name in files:
                if ".tern." in name:
                    continue
                path = os.path.join(root, name)
                rel = os.path.relpath(path, dst)
                try:
                    st = os.lstat(path)
                    if not os.path.isfile(path) or os.path.islink(path):
                        continue
                    # ctime: tern sets the source's mtime, so a rewrite in
                    # place would keep it.
                    key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                    if seen.get(rel) == key:
                        continue
                    # Opened once: what is read is the inode that was at the
                    # final name, whole, even if it is replaced meanwhile.
                    got = digest(path)
                except FileNotFoundError:
                    continue
                if rel not in want:
                    try:
                        want[rel] = digest(os.path.join(src, rel))
                    except OSError:
                        want[rel] = None  # not in the source at all
                checked += 1
                if got == want[rel]:
                    seen[rel] = key
                elif rel not in wrong:
                    wrong.add(rel)
                    print(f"wrong content at final name {rel}", flush=True)
        if last:
            break
        # Polling, not synchronisation: leave the CPU to tern between scans.
        time.sleep(0.02)
    if wrong:
        sys.exit(1)
    print(f"watched: {scans} scans, {checked} files checked")


if __name__ == "__main__":
    main()
