"""`bench serving --concurrency 1,2 --plot` against the tiny api_server: one run per rung, every
request's TTFT / TPOT kept, a PNG written."""

from __future__ import annotations

import json

from PIL import Image

from litedeploy.cli.main import main


def test_serving_ladder_and_plot(tiny_llama_server, tmp_path, capsys):
    png, out = tmp_path / "serving.png", tmp_path / "serving.json"
    code = main(["bench", "serving", "--url", tiny_llama_server.server.url, "--num-prompts", "4",
                 "--max-tokens", "4", "--concurrency", "1,2", "--output-json", str(out),
                 "--plot", str(png)])
    assert code == 0 and f"plot: {png}" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["benchmark"] == "serving_sweep"
    assert [run["max_concurrency"] for run in result["runs"]] == [1, 2]
    for run in result["runs"]:
        assert run["completed"] == 4 and run["errors"] == 0
        assert len(run["ttft_ms_all"]) == 4 and len(run["tpot_ms_all"]) == 4
        assert run["peak_concurrency"] <= run["max_concurrency"]
    with Image.open(png) as image:
        assert image.size == (1650, 462)
