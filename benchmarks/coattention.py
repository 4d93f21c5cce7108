"""Benchmark: explicit vs fused co-attention (wsss.models.coattention), forward + backward.

For each feature size S x S (both images), batch B and channels C, each implementation runs
in a fresh subprocess: the first forward+backward (cold) gives the peak memory, the next
``--repeats`` give the median time. Printed: times, peak memory, and the fused/explicit ratios.

Peak memory: on CUDA torch.cuda.max_memory_allocated() minus what was allocated before the
step; on CPU the process's resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs just before the step; ru_maxrss where that is unavailable) minus the
resident set before the step. torch's CPU allocations are invisible to tracemalloc, and a
fresh process per measurement keeps one run's allocator cache out of the next.

    python benchmarks/coattention.py                       # sizes 32 64 96, batches 2 8, C=512
    python benchmarks/coattention.py --quick               # sizes 32 64, batch 2, 1 repeat
    python benchmarks/coattention.py --device cuda --dtype bf16

A configuration whose explicit affinity would not fit (about 7 B (HW)^2 values live at the
peak) in --max-gb (default: half the available memory) is skipped and reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


# ----------------------------------------------------------------------- child process
def _rss_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")   # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def child(impl: str, batch: int, size: int, channels: int, device: str, dtype: str,
          repeats: int) -> dict:
    import torch

    from wsss.models.coattention import co_attention

    dev = torch.device(device)
    dt = getattr(torch, DTYPES[dtype])

    def inputs(b, s):
        g = torch.Generator().manual_seed(0)
        f_m = torch.randn(b, channels, s, s, generator=g).to(dev).requires_grad_(True)
        f_n = torch.randn(b, channels, s, s, generator=g).to(dev).requires_grad_(True)
        weight = (torch.eye(channels) / channels ** 0.5).to(dev).requires_grad_(True)
        return f_m, f_n, weight

    def step(f_m, f_n, weight):
        with torch.autocast(dev.type, dtype=dt, enabled=dt != torch.float32):
            o_m, o_n = co_attention(f_m, f_n, weight, impl=impl)
            loss = o_m.float().sum() + o_n.float().sum()
        loss.backward()
        for t in (f_m, f_n, weight):
            t.grad = None
        if dev.type == "cuda":
            torch.cuda.synchronize()

    # Warm-up on a tiny input: pages in the kernels' code (file-backed RSS that would
    # otherwise count as "memory" of the first measured step) and initialises thread pools.
    step(*inputs(1, 4))
    tensors = inputs(batch, size)

    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(*tensors)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _rss_bytes("VmRSS")
        if base is not None and _reset_cpu_peak():
            step(*tensors)
            peak = _rss_bytes("VmHWM") - base
        else:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            step(*tensors)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    times = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        step(*tensors)
        times.append(time.perf_counter() - t0)
    return {"time_s": statistics.median(times), "peak_bytes": peak}


# ----------------------------------------------------------------------- parent
def _available_gb() -> float:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return 8.0


def explicit_need_gb(batch: int, size: int, dtype: str) -> float:
    """Rough peak of the explicit path: ~7 live (B, HW, HW) matrices (P, two softmaxes and
    their gradients; measured 6.2 at B=2, 96x96, fp32 on CPU)."""
    return 7 * batch * size ** 4 * (2 if dtype == "bf16" else 4) / 2 ** 30


def run_one(impl, batch, size, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, str(batch), str(size),
           str(args.channels), args.device, args.dtype, str(args.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 96],
                   help="feature sizes S (S x S)")
    p.add_argument("--batches", type=int, nargs="+", default=[2, 8])
    p.add_argument("--channels", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--repeats", type=int, default=3, help="timed steps after the cold one (median)")
    p.add_argument("--max-gb", type=float, default=None,
                   help="skip configs needing more (default: half of available)")
    p.add_argument("--quick", action="store_true", help="sizes 32 64, batch 2, 1 repeat")
    p.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        impl, b, s, c, dev, dt, r = args.child
        print(json.dumps(child(impl, int(b), int(s), int(c), dev, dt, int(r))))
        return
    if args.quick:
        args.sizes, args.batches, args.repeats = [32, 64], [2], 1
    max_gb = args.max_gb if args.max_gb is not None else 0.5 * _available_gb()
    print(f"co-attention fwd+bwd, C={args.channels}, device={args.device}, dtype={args.dtype}, "
          f"median of {args.repeats} (peak memory: first step)")
    header = (f"{'B':>3} {'size':>7} {'explicit ms':>12} {'fused ms':>10} {'time f/e':>9} "
              f"{'explicit MB':>12} {'fused MB':>10} {'mem f/e':>8}")
    print(header)
    print("-" * len(header))
    for batch in args.batches:
        for size in args.sizes:
            need = explicit_need_gb(batch, size, args.dtype)
            label = f"{size}x{size}"
            if args.device == "cpu" and need > max_gb:
                print(f"{batch:>3} {label:>7}   skipped: explicit needs ~{need:.1f} GB "
                      f"> {max_gb:.1f} GB (--max-gb)")
                continue
            res = {impl: run_one(impl, batch, size, args) for impl in ("explicit", "fused")}
            if any("error" in r for r in res.values()):
                print(f"{batch:>3} {label:>7}   failed: {res}")
                continue
            e, f = res["explicit"], res["fused"]
            mem_ratio = f["peak_bytes"] / max(e["peak_bytes"], 1)
            print(f"{batch:>3} {label:>7} {e['time_s'] * 1e3:>12.1f} {f['time_s'] * 1e3:>10.1f} "
                  f"{f['time_s'] / e['time_s']:>9.2f} {e['peak_bytes'] / 2**20:>12.1f} "
                  f"{f['peak_bytes'] / 2**20:>10.1f} {mem_ratio:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
