"""Summarise `py-spy record -f raw` files: the frames with the most samples, self and inclusive.

    python benchmarks/pyspy_top.py [--top 25] [--hide REGEX] w1.txt w2.txt ...

Samples of the uvicorn supervisor's ping thread and of the bootstrap frames every sample shares are
hidden by default, so that the percentages read as "share of the worker's busy samples".
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

NOISE = r"multiprocessing/|threading\.py|Process\.(pong|always_pong)|<module>|uvicorn/(_subprocess|_compat|server)|" \
        r"supervisors/|asyncio/runners|spawn_main"
SITE = re.compile(r"/\S*?/lib/python3\.\d+/(site-packages/)?")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--hide", default=NOISE, help="frames to leave out of the inclusive list")
    args = p.parse_args()
    hide = re.compile(args.hide)
    leaf: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for name in args.files:
        for line in open(name):
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack or "Process.pong" in stack:  # the supervisor ping thread, blocked in recv
                continue
            n = int(count)
            frames = [SITE.sub("", f) for f in stack.split(";")]
            total += n
            leaf[frames[-1]] += n
            for f in set(frames):
                if not hide.search(f):
                    incl[f] += n
    print(f"{total} samples (ping thread left out)")
    for title, counter in (("self", leaf), ("inclusive", incl)):
        print(f"--- {title}")
        for frame, n in counter.most_common(args.top):
            print(f"{100 * n / max(total, 1):5.1f}%  {frame}")


if __name__ == "__main__":
    main()
