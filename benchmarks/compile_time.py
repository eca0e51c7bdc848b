"""What ``run.compile`` costs up front: seconds of the first ResNet-20 W4A4 training step (batch
128) with compiled quantizer kernels, with an empty torch.compile cache and again with the
on-disk cache the first run filled, against a steady step. Each measurement runs in a fresh
process (the in-memory caches would hide the build).
Run: python benchmarks/compile_time.py [--methods dsq ewgs lsq]"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile


def measure(method: str) -> dict[str, float]:
    """In this process: the first step (compiling), then a steady one."""
    import time

    import torch
    import torch.nn.functional as F

    from sqakd.models import build_model
    from sqakd.quant import QuantPolicy, calibrate, prepare

    torch.manual_seed(0)
    images, labels = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    policy = QuantPolicy(method=method, weight_bits=4, act_bits=4)
    student = prepare(build_model("resnet20", num_classes=10), policy, compiled_kernels=True)
    calibrate(student, [images])
    seconds = {}
    for name in ("first", "steady"):
        start = time.perf_counter()
        F.cross_entropy(student(images), labels).backward()
        seconds[name] = time.perf_counter() - start
    return seconds


def in_fresh_process(method: str, cache: str) -> dict[str, float]:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
    output = subprocess.run(
        [sys.executable, __file__, "--child", method],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--methods", nargs="*", default=["dsq", "ewgs", "lsq"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child)))
        return
    from _timing import machine

    print(f"ResNet-20 W4A4, batch 128, compiled quantizer kernels; machine: {machine()}\n")
    print("| method | first step, empty cache s | first step, disk cache s | steady step s |")
    print("|---|---|---|---|")
    for method in args.methods:
        with tempfile.TemporaryDirectory() as cache:
            cold = in_fresh_process(method, cache)
            warm = in_fresh_process(method, cache)
        print(f"| {method} | {cold['first']:.1f} | {warm['first']:.1f} | {warm['steady']:.2f} |")


if __name__ == "__main__":
    main()
