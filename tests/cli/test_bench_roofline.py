"""The GPU summaries read decode bandwidth against the copy bandwidth measured in the same run."""

from __future__ import annotations

import json

import pytest
import torch

from litedeploy.bench import tp_scaling
from litedeploy.bench.summary import share_of_copy_bandwidth, summary_rows

LATENCY = {"litedeploy": {"decode_tokens_per_s": 500.0, "decode_ms_per_step": 2.0,
                          "weight_bandwidth_tb_s": 1.94}}


def test_percentage_uses_the_measured_copy_bandwidth():
    # the case: 1.94 TB/s is 63% of an H100's 3.0 TB/s but 45% of an H200's 4.3
    row = summary_rows(LATENCY, {}, {}, {"copy_bandwidth_tb_s": 4.31})[0][1]
    assert "45% of the measured 4.31 TB/s copy bandwidth" in row
    assert "not measured" in summary_rows(LATENCY, {}, {}, None)[0][1]
    assert share_of_copy_bandwidth(1.0, {}) == "copy bandwidth not measured"


def test_tp_summary_table_and_ratios(tmp_path):
    def write(name, result):
        (tmp_path / name).write_text(json.dumps(result))

    info = {"engine_info": {"kv_cache_tokens": 1000}}
    for tp, (b1, b64, out) in {1: (500.0, 9000.0, 20000.0), 2: (600.0, 12000.0, 30000.0)}.items():
        write(f"1_8b_tp{tp}_latency_b1.json", {"decode_tokens_per_s": b1, "decode_ms_per_step":
                                               1000 / b1, "weight_bandwidth_tb_s": 2.15, **info})
        write(f"1_8b_tp{tp}_latency_b64.json", {"decode_tokens_per_s": b64,
                                                "decode_ms_per_step": 64000 / b64})
        write(f"1_8b_tp{tp}_throughput.json", {"output_tokens_per_s": out, "elapsed_s": 10.0,
                                               "num_preemptions": 0})
    write("copy_bandwidth.json", {"copy_bandwidth_tb_s": 4.3, "size_gib": 4, "num_iters": 10})
    (tmp_path / "steps.txt").write_text("tests 0 50\n7b_tp2 124 200\n")
    merged = tp_scaling.collect(tmp_path)
    assert set(merged["runs"]) == {"1_8b_tp1", "1_8b_tp2"}
    assert merged["steps"][1] == {"name": "7b_tp2", "rc": 124, "seconds": 200}
    table = tp_scaling.render(merged)
    assert "| 1.20x | 1.33x | 1.50x |" in table  # batch 1, batch 64, throughput
    assert "2.15 TB/s 50% of the measured 4.30 TB/s" in table


@pytest.mark.skipif(not torch.cuda.is_available(), reason="measures a CUDA device")
def test_copy_bandwidth_is_measured():
    from litedeploy.bench.copy_bandwidth import measure_copy_bandwidth

    result = measure_copy_bandwidth(torch.device("cuda"), size_gib=0.5, num_iters=3)
    assert 0.1 < result["copy_bandwidth_tb_s"] < 20
