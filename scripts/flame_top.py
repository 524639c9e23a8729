"""Summarise a `py-spy record -f raw` file: the share of samples in which each function appears
(inclusive), top N. Used by scripts/gpu_session.sh's `profile` phase.

    python scripts/flame_top.py profile.txt [N]
"""

from __future__ import annotations

import collections
import sys


def main() -> None:
    path, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40
    counts: collections.Counter = collections.Counter()
    total = 0
    for line in open(path):
        stack, _, k = line.rstrip("\n").rpartition(" ")
        if not k.isdigit():
            continue
        total += int(k)
        seen = set()
        for frame in stack.split(";"):
            name = frame.split(" (")[0] + " " + frame.rsplit("/", 1)[-1].rstrip(")") if "/" in frame else frame
            if name not in seen:
                seen.add(name)
                counts[name] += int(k)
    print(f"{total} samples")
    for name, k in counts.most_common(n):
        print(f"{100 * k / max(total, 1):5.1f}%  {name[:140]}")


if __name__ == "__main__":
    main()
