"""Decode GEMV vs cuBLAS at a decoder's linear shapes (CUDA only).

`python -m litedeploy.bench.gemv_bench [--sweep] --output-json out.json` times y = x @ W^T for
each linear of the InternLM2-1.8B shape (qkv, o, gate_up, down, lm_head) at 1..16 rows: cuBLAS
(F.linear) against the Triton GEMV (kernels/triton_gemv.py), and with --sweep every tile config
at 1 and 8 rows. Each variant is captured in a CUDA graph over enough weight copies to exceed
twice the L2 (as the model's 24 layers do), so the weights come from HBM; median of the replays.
Bandwidth counts the weight bytes (x and y are tiny).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from litedeploy.bench.common import write_json

# (name, N, K) of the InternLM2-1.8B shape: hidden 2048, 16/8 heads of 128, FFN 8192, vocab 92544
SHAPES = [("qkv", 4096, 2048), ("o", 2048, 2048), ("gate_up", 16384, 2048),
          ("down", 2048, 8192), ("lm_head", 92544, 2048)]


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
    for _ in range(3):
        graph.replay()
    times_ms = []
    for _ in range(15):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times_ms.append(start.elapsed_time(end))
    return statistics.median(times_ms) * 1000 / len(fns)


def sweep_configs() -> list[tuple[int, int, int]]:
    return [(bn, bk, w) for bn in (4, 8, 16, 32) for bk, w in ((256, 4), (512, 4), (1024, 8))]


def time_int4(n_dim: int, k_dim: int, l2_bytes: int, group_size: int = 128) -> dict:
    """One row through the int4 GEMV (row form) and through awq_gemm (AWQ layout, split-K)."""
    from litedeploy.kernels import triton_quant_gemm as tqg
    from litedeploy.layers.quant_linear import awq_layout, dequantize_int4, quantize_int4

    q_bytes = n_dim * k_dim // 2
    copies = max(2, min(48, -(-3 * l2_bytes // q_bytes)))
    rows = [quantize_int4(torch.randn(n_dim, k_dim, device="cuda"), group_size)
            for _ in range(copies)]
    awq = [awq_layout(*r) for r in rows]
    x = torch.randn(1, k_dim, dtype=torch.bfloat16, device="cuda")
    ref = x.double() @ dequantize_int4(*rows[0], group_size).double().T
    out = tqg.int4_gemv(x, *rows[0], group_size).double()
    t_gemv = graph_time_us([lambda r=r: tqg.int4_gemv(x, *r, group_size) for r in rows])
    t_awq = graph_time_us([lambda a=a: tqg.awq_gemm(x, *a, group_size) for a in awq])
    return {"gemv_us": t_gemv, "awq_gemm_us": t_awq, "gemv_gb_s": q_bytes / t_gemv / 1e3,
            "rel_err": float((out - ref).norm() / ref.norm())}


def main() -> int:
    from litedeploy.kernels import triton_gemv

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    l2_bytes = torch.cuda.get_device_properties(0).L2_cache_size
    rows_list = (1, 2, 8)
    result: dict = {"gpu": torch.cuda.get_device_name(0), "shapes": []}
    for name, n_dim, k_dim in SHAPES:
        w_bytes = n_dim * k_dim * 2
        copies = max(2, min(48, -(-3 * l2_bytes // w_bytes)))
        weights = [torch.randn(n_dim, k_dim, dtype=torch.bfloat16, device="cuda") * 0.02
                   for _ in range(copies)]
        entry: dict = {"name": name, "n": n_dim, "k": k_dim, "rows": {}}
        for rows in rows_list:
            x = torch.randn(rows, k_dim, dtype=torch.bfloat16, device="cuda")
            t_cublas = graph_time_us([lambda w=w, x=x: torch.nn.functional.linear(x, w)
                                      for w in weights])
            row = {"cublas_us": t_cublas, "cublas_gb_s": w_bytes / t_cublas / 1e3}
            if rows <= triton_gemv.MAX_GEMV_ROWS:
                ref = torch.nn.functional.linear(x.double(), weights[0].double())
                out = triton_gemv.gemv(x, weights[0]).double()
                row["rel_err"] = float((out - ref).norm() / ref.norm())
                t_gemv = graph_time_us([lambda w=w, x=x: triton_gemv.gemv(x, w) for w in weights])
                row.update(gemv_us=t_gemv, gemv_gb_s=w_bytes / t_gemv / 1e3,
                           config=triton_gemv.pick_config(rows, n_dim, k_dim,
                                                          triton_gemv._num_sms(x.device)))
                if args.sweep and rows in (1, 8):
                    timed = []
                    for cfg in sweep_configs():
                        t = graph_time_us([lambda w=w, c=cfg, x=x: triton_gemv.gemv(x, w, config=c)
                                           for w in weights])
                        timed.append((t, cfg))
                    timed.sort()
                    row["sweep_best"] = [{"us": t, "gb_s": w_bytes / t / 1e3, "config": c}
                                         for t, c in timed[:3]]
            entry["rows"][rows] = row
        if name != "lm_head":
            del weights
            entry["int4"] = time_int4(n_dim, k_dim, l2_bytes)
        result["shapes"].append(entry)
        weights = None
        torch.cuda.empty_cache()
    write_json(result, args.output_json)
    print("\n| linear | N x K | rows | cuBLAS us (GB/s) | GEMV us (GB/s) | sweep best |")
    print("| --- | --- | --- | --- | --- | --- |")
    for entry in result["shapes"]:
        for rows, row in entry["rows"].items():
            gemv = (f"{row['gemv_us']:.1f} ({row['gemv_gb_s']:.0f}) {row['config']}"
                    if "gemv_us" in row else "-")
            best = row.get("sweep_best")
            best_txt = f"{best[0]['us']:.1f} ({best[0]['gb_s']:.0f}) {best[0]['config']}" \
                if best else ""
            print(f"| {entry['name']} | {entry['n']}x{entry['k']} | {rows} | "
                  f"{row['cublas_us']:.1f} ({row['cublas_gb_s']:.0f}) | {gemv} | {best_txt} |")
    print("\n| linear | int4 1 row: GEMV us (GB/s of int4) | awq_gemm us |")
    print("| --- | --- | --- |")
    for entry in result["shapes"]:
        if "int4" in entry:
            i4 = entry["int4"]
            print(f"| {entry['name']} | {i4['gemv_us']:.1f} ({i4['gemv_gb_s']:.0f}) | "
                  f"{i4['awq_gemm_us']:.1f} |")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    raise SystemExit(main())
