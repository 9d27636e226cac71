"""Device-to-device copy bandwidth of this GPU: the roofline that decode bandwidth is read against.

A fixed figure is wrong on another card (an H100's 3.0 TB/s made an H200 look 63% busy at 45%),
so the GPU suites measure it in the same run: one 4 GiB bfloat16 copy timed with CUDA events,
median of 10 after 3 warm-ups, counting bytes read plus bytes written (as STREAM's copy does).

`python -m litedeploy.bench.copy_bandwidth --output-json copy_bandwidth.json`
"""

from __future__ import annotations

import argparse
import statistics

import torch

from litedeploy.bench.common import write_json


def measure_copy_bandwidth(device: torch.device, size_gib: float = 4.0, num_iters: int = 10,
                           num_warmup: int = 3) -> dict:
    numel = int(size_gib * 2**30) // 2  # bfloat16: 2 bytes
    src = torch.empty(numel, dtype=torch.bfloat16, device=device).normal_()  # not zeros
    dst = torch.empty_like(src)
    for _ in range(num_warmup):
        dst.copy_(src)
    times_ms = []
    for _ in range(num_iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times_ms.append(start.elapsed_time(end))
    if not torch.equal(dst[-1024:], src[-1024:]):
        raise RuntimeError("the copy did not copy")
    median_ms = statistics.median(times_ms)
    moved = 2 * numel * 2  # read once, written once
    return {"size_gib": size_gib, "dtype": "bfloat16", "num_iters": num_iters,
            "median_ms": median_ms, "times_ms": times_ms,
            "copy_bandwidth_tb_s": moved / (median_ms / 1000) / 1e12,
            "counts": "bytes read + bytes written",
            "gpu": torch.cuda.get_device_name(device)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--size-gib", type=float, default=4.0)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("copy bandwidth: no CUDA device")
    write_json(measure_copy_bandwidth(torch.device(args.device), args.size_gib), args.output_json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
