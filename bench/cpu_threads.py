"""Diagnostic: torch's 2 OpenMP threads on a small shared CPU.

ResNet18 batch-1 forward (the Predictor's floor) and one level-fc head step (batch 16, ResNet18 head) at 1 vs 2
torch threads, with no extra load and with one busy competitor process (a pure-Python loop this script starts
and stops by its pid). On a 2-core machine a second busy process makes the 2-thread runs wait at every
OpenMP barrier for a descheduled thread: medians move a little, tails a lot.

    python bench/cpu_threads.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

import torch

from covid_cls.models import build_model, make_head

import _common as C


def measure(fn, n: int) -> list[float]:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1000)
    return ts


def main() -> int:
    print(C.header("cpu_threads", "cpu"))
    torch.manual_seed(0)
    model = build_model("resnet18", "fc", weights="none").eval()
    x = torch.randn(1, 3, 224, 224)
    head = make_head(512, 4300, 2).train()
    opt = torch.optim.SGD(head.parameters(), lr=1e-3, momentum=0.9)
    f, y = torch.randn(16, 512), torch.randint(0, 2, (16,))

    def forward():
        with torch.inference_mode():
            model(x)

    def head_step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(f), y).backward()
        opt.step()

    work = {"resnet18 bs1 forward": (forward, 10), "fc head step bs16": (head_step, 20)}
    res: dict = {}
    for busy in (False, True):
        comp = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        time.sleep(0.5)
        try:
            for _ in range(3):                          # threads 2 and 1 alternately, 3 rounds
                for threads in (2, 1):
                    torch.set_num_threads(threads)
                    for name, (fn, n) in work.items():
                        fn()
                        res.setdefault((busy, threads, name), []).extend(measure(fn, n))
        finally:
            if comp is not None:
                comp.kill()
                comp.wait()
    torch.set_num_threads(2)
    rows = []
    for busy in (False, True):
        for threads in (2, 1):
            row = ["1 busy process" if busy else "none (of this script's)", threads]
            for name in work:
                v = res[(busy, threads, name)]
                row.append(f"{statistics.median(v):.1f} / {C.pct(v, 95):.1f}")
            rows.append(row)
    print(C.table(["extra load", "torch threads", "ResNet18 bs1 forward ms (median / p95)",
                   "fc head step bs16 ms (median / p95)"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
