#!/usr/bin/env bash
# Triton kernels on a CUDA machine: the correctness tests against the torch twins, then a decode
# micro-benchmark (InternLM2-1.8B attention: 16 heads, 8 KV heads, head_dim 128, block 64, bf16)
# at batch 1/64/256 x context 512/2048, kernel time and achieved bandwidth vs the twin.
#
#   bash benchmarks/kernel_check.sh            # tests + benchmark
#   KERNEL_SWEEP=1 bash benchmarks/kernel_check.sh   # also sweep decode tile/warps/stages
#   SKIP_TESTS=1 ...                           # benchmark only
#
# Timing: each variant is captured in a CUDA graph (no launch gaps) over enough copies of the
# cache to exceed twice the L2, so every call reads K/V from HBM; median of the replays.
# Bandwidth counts the bytes that must move: K and V of every context token, q and out.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}."
PYTHON="${PYTHON:-python3}"

if [[ "${SKIP_TESTS:-0}" != "1" ]]; then
    "$PYTHON" -m pytest tests/kernels -q
fi

"$PYTHON" - <<'EOF'
import os
import statistics

import torch

from litedeploy.kernels import reference
from litedeploy.kernels import triton_attention as tri

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 16, 8, 128, 64
DTYPE = torch.bfloat16
L2_BYTES = torch.cuda.get_device_properties(0).L2_cache_size
print(f"card: {torch.cuda.get_device_name(0)}, L2 {L2_BYTES >> 20} MiB, torch {torch.__version__}")


def decode_inputs(batch: int, context_len: int) -> dict:
    blocks_per_seq = context_len // BLOCK
    num_blocks = batch * blocks_per_seq
    tables = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(batch, -1)
    shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    context_lens = torch.full((batch,), context_len, dtype=torch.int32, device="cuda")
    q_lens = torch.ones(batch, dtype=torch.int32, device="cuda")
    return dict(
        q=torch.randn(batch, HEADS, HEAD_DIM, dtype=DTYPE, device="cuda"),
        k_cache=torch.randn(shape, dtype=DTYPE, device="cuda"),
        v_cache=torch.randn(shape, dtype=DTYPE, device="cuda"),
        block_tables=tables,
        context_lens=context_lens,
        cu_seqlens_q=torch.arange(batch + 1, dtype=torch.int32, device="cuda"),
        max_q_len=1,
        max_context_len=context_len,
        scale=HEAD_DIM**-0.5,
        # the engine builds the mask once per step; keep its boolean indexing out of the timing
        mask=reference.paged_attention_mask(q_lens, context_lens, 1, context_len),
    )


def graph_time_us(fns: list) -> float:
    """Median time of one call, from CUDA-graph replays of all `fns` in a row."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    times_ms = []
    for _ in range(3):
        graph.replay()
    for _ in range(15):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times_ms.append(start.elapsed_time(end))
    return statistics.median(times_ms) * 1000 / len(fns)


def bench_decode(batch: int, context_len: int, sweep: bool) -> None:
    kv_bytes = 2 * batch * context_len * KV_HEADS * HEAD_DIM * DTYPE.itemsize
    moved_bytes = kv_bytes + 2 * batch * HEADS * HEAD_DIM * DTYPE.itemsize
    copies = max(1, min(64, -(-2 * L2_BYTES // kv_bytes)))
    sets = [decode_inputs(batch, context_len) for _ in range(copies)]
    no_mask = [{k: v for k, v in s.items() if k != "mask"} for s in sets]
    tri_args = [{k: v for k, v in s.items() if k != "max_q_len"} for s in no_mask]

    # correctness on these exact inputs first
    err = (tri.paged_attention(**no_mask[0]).float() - reference.paged_attention(**sets[0]).float())
    rel = float(err.norm() / reference.paged_attention(**sets[0]).float().norm())

    t_tri = graph_time_us([lambda a=a: tri.paged_attention(**a) for a in no_mask])
    t_ref = graph_time_us([lambda s=s: reference.paged_attention(**s) for s in sets])
    splits = tri._pick_num_splits(batch * KV_HEADS, context_len, 64, torch.device("cuda"))
    print(
        f"{batch:>5} {context_len:>7} {splits:>6} {t_tri:>9.1f} {moved_bytes / t_tri / 1e3:>8.0f}"
        f" {t_ref:>9.1f} {moved_bytes / t_ref / 1e3:>8.0f} {t_ref / t_tri:>7.1f}x  {rel:.1e}"
    )
    if not sweep:
        return
    results = []
    for block_n in (32, 64, 128):
        for warps in (4, 8):
            for stages in (2, 3):
                for num_splits in sorted({1, splits, 2 * splits}):
                    kw = dict(block_n=block_n, num_warps=warps, num_stages=stages,
                              num_splits=num_splits)
                    try:
                        t = graph_time_us([lambda a=a, kw=kw: tri.decode_attention(**a, **kw)
                                           for a in tri_args])
                    except Exception as exc:  # a config may not compile; say so, go on
                        print(f"      sweep {kw}: {type(exc).__name__}")
                        continue
                    results.append((t, kw))
    results.sort(key=lambda r: r[0])
    for t, kw in results[:3]:
        print(f"      sweep best: {t:7.1f} us {moved_bytes / t / 1e3:6.0f} GB/s  {kw}")


def bench_prefill(batch: int, new_tokens: int) -> None:
    """Fresh prompts (no prefix): causal FLOPs = 2 matmuls * 2 * H * D * T^2 / 2 per sequence."""
    from triton.testing import do_bench

    blocks = batch * new_tokens // BLOCK
    shape = (blocks, BLOCK, KV_HEADS, HEAD_DIM)
    args = dict(
        q=torch.randn(batch * new_tokens, HEADS, HEAD_DIM, dtype=DTYPE, device="cuda"),
        k_cache=torch.randn(shape, dtype=DTYPE, device="cuda"),
        v_cache=torch.randn(shape, dtype=DTYPE, device="cuda"),
        block_tables=torch.randperm(blocks, device="cuda", dtype=torch.int32).view(batch, -1),
        context_lens=torch.full((batch,), new_tokens, dtype=torch.int32, device="cuda"),
        cu_seqlens_q=torch.arange(0, batch + 1, dtype=torch.int32, device="cuda") * new_tokens,
        max_q_len=new_tokens, max_context_len=new_tokens, scale=HEAD_DIM**-0.5,
    )
    out, ref = tri.paged_attention(**args).float(), reference.paged_attention(**args).float()
    rel = float((out - ref).norm() / ref.norm())
    flops = 2 * 2 * batch * HEADS * HEAD_DIM * new_tokens**2 / 2
    t_tri = do_bench(lambda: tri.paged_attention(**args), return_mode="median") * 1000
    t_ref = do_bench(lambda: reference.paged_attention(**args), return_mode="median") * 1000
    print(f"prefill {batch}x{new_tokens}: triton {t_tri:.0f} us ({flops / t_tri / 1e6:.0f} TFLOP/s)"
          f", twin {t_ref:.0f} us ({flops / t_ref / 1e6:.0f} TFLOP/s), rel err {rel:.1e}")


torch.manual_seed(0)
sweep = os.environ.get("KERNEL_SWEEP") == "1"
print("decode, bf16, 16 heads / 8 kv heads, head_dim 128, block 64")
print("batch context splits triton_us    GB/s    twin_us    GB/s speedup  rel_err")
for batch in (1, 64, 256):
    for context_len in (512, 2048):
        bench_decode(batch, context_len, sweep)
bench_prefill(4, 2048)
EOF
