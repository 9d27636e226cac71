"""The GPU suite's pieces that run on any machine: ncu CSV parsing/grouping and the summary's
verdicts against issue 15's targets."""

from __future__ import annotations

import json
import sys

from litedeploy.bench import wave_summary
from litedeploy.bench.kernel_profile import group_of, parse_ncu_csv

NCU_CSV = """==PROF== Connected to process 1
"ID","Kernel Name","Block Size","gpu__time_duration.sum"
"","","","nsecond"
"0","_gemv_kernel","(128, 1, 1)","4,352"
"1","_rms_norm_kernel","(256, 1, 1)","2912"
"2","void at::reduce_kernel<512, 1, at::ReduceOp<float, at::ArgMaxOps<float>>>","(512, 1, 1)","29400"
"""


def test_ncu_csv_rows_and_groups():
    rows = parse_ncu_csv(NCU_CSV)
    assert rows == [("_gemv_kernel", 4.352), ("_rms_norm_kernel", 2.912),
                    (rows[2][0], 29.4)]  # the units row is skipped, thousands separators read
    assert [group_of(name) for name, _ in rows] == [
        "gemv (Triton)", "rms_norm (+ residual)", "argmax / sampler"]
    assert group_of("_int4_gemv_kernel").startswith("int4")
    assert group_of("_reduce_splits_kernel").startswith("decode attention")


def test_summary_verdicts(tmp_path, capsys, monkeypatch):
    wave = {"machine": {"gpu": "NVIDIA H200"},
            "latency_b1": {"decode_tokens_per_s": 760.0, "decode_ms_per_step": 1.316,
                           "weight_bandwidth_tb_s": 2.58},
            "latency_b64": {"decode_tokens_per_s": 23000.0, "decode_ms_per_step": 2.78},
            "ttft": {"ttft_ms_median": 11.0},
            "throughput_runs": [{"output_tokens_per_s": v, "num_preemptions": 0}
                                for v in (30000.0, 33000.0, 34000.0)],
            "throughput_median_out_tok_s": 33000.0}
    (tmp_path / "wave.json").write_text(json.dumps(wave))
    (tmp_path / "copy_bandwidth.json").write_text(json.dumps({"copy_bandwidth_tb_s": 4.27}))
    (tmp_path / "latency_awq_gemv1.json").write_text(json.dumps(
        {"litedeploy": {"decode_tokens_per_s": 988.0, "decode_ms_per_step": 1.01}}))
    monkeypatch.setattr(sys, "argv", ["wave_summary", str(tmp_path)])
    assert wave_summary.main() == 0
    table = {line.split(" | ")[0].lstrip("| "): line for line in capsys.readouterr().out.splitlines()
             if line.startswith("| ")}
    assert table["batch-1 decode, 512 in / 256 out"].endswith("| reached |")
    assert "60% of 4.27 TB/s" in table["batch-1 decode, 512 in / 256 out"]
    assert table["batch-64 decode, 512 in / 256 out"].endswith("| missed |")
    assert table["offline 1000 x 512/256 (ratio 0.5), median of 3"].endswith("| reached |")
    assert table["TTFT, one 512-token prompt, idle engine"].endswith("| reached |")
    assert "1.30x bf16" in table["AWQ int4 batch-1 decode vs bf16, int4 GEMV"]
    assert table["AWQ int4 batch-1 decode vs bf16, int4 GEMV"].endswith("| missed |")
