"""`bench sweep --plot` on a tiny model, and the committed H200 results rendered to PNG files."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from litedeploy.bench.plots import plot_result, roofline_step_ms
from litedeploy.cli.main import main
from tests.helpers import tiny_models

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
SWEEP_PNG = (1210, 462)  # 11 x 4.2 inches at 110 dpi
SERVING_PNG = (1650, 462)  # 15 x 4.2 inches


def test_bench_sweep_writes_json_and_plot(tmp_path, capsys):
    folder, _ = tiny_models.make_llama(tmp_path / "llama")
    png, out = tmp_path / "plots" / "sweep.png", tmp_path / "sweep.json"
    code = main(["bench", "sweep", str(folder), "--device", "cpu", "--batch-sizes", "1,3",
                 "--input-len", "8", "--output-len", "4", "--num-iters", "1",
                 "--cache-max-tokens", "256", "--output-json", str(out), "--plot", str(png)])
    assert code == 0 and f"plot: {png}" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert [run["batch_size"] for run in result["runs"]] == [1, 3]
    assert all(run["decode_tokens_per_s"] > 0 for run in result["runs"])
    assert result["copy_bandwidth_tb_s"] is None  # CPU: no measured roofline, none drawn
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == SWEEP_PNG


def test_committed_h200_results_render(tmp_path):
    sweep = json.loads((RESULTS / "gpu-h200-sweep.json").read_text())
    # the roofline: weights + KV read once at the measured copy bandwidth, rising with the batch
    roof = [roofline_step_ms(run["batch_size"], sweep) for run in sweep["runs"]]
    assert roof == sorted(roof) and all(r < run["decode_ms_per_step"]
                                        for r, run in zip(roof, sweep["runs"]))
    serving = json.loads((RESULTS / "gpu-h200-serving.json").read_text())
    assert all(len(run["ttft_ms_all"]) == run["completed"] for run in serving["runs"])
    for name, result, size in (("sweep", sweep, SWEEP_PNG), ("serving", serving, SERVING_PNG)):
        with Image.open(plot_result(result, tmp_path / f"{name}.png")) as image:
            assert image.size == size
        with Image.open(RESULTS / f"gpu-h200-{name}.png") as image:  # the README's figures
            assert image.size == size
