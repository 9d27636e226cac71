"""`litedeploy check` on the tiny models: passes on each, fails once our loader maps one weight
wrongly. InternLM2's transformers code is remote, so its reference is the Llama twin holding the
same weights (as in tests/models/test_hf_equivalence.py), passed with --reference."""

from __future__ import annotations

import json

import pytest

from litedeploy.cli.main import main
from litedeploy.models.decoder import DecoderForCausalLM
from tests.helpers import tiny_models

ROWS = ["tokenizer", "chat template", "special tokens", "logits", "greedy tokens"]


def _check(argv: list[str], tmp_path, capsys) -> tuple[int, dict, str]:
    out = tmp_path / "check.json"
    code = main(["check", *argv, "--device", "cpu", "--max-new-tokens", "8",
                 "--output-json", str(out)])
    return code, json.loads(out.read_text()), capsys.readouterr().out


@pytest.mark.parametrize("kind", ["llama", "qwen2", "internlm2"])
def test_check_passes_on_tiny_models(kind, tmp_path, capsys):
    folder, _ = getattr(tiny_models, f"make_{kind}")(tmp_path / kind)
    argv = [str(folder)]
    if kind == "internlm2":
        argv += ["--reference", str(tmp_path / "internlm2-llama-twin")]
    code, report, out = _check(argv, tmp_path, capsys)
    assert code == 0, out
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == ROWS and report["passed"] and report["quantized"] is False
    assert all(row["status"] == "pass" for name, row in rows.items()
               if not (kind == "internlm2" and name == "chat template"))  # it ships none
    assert rows["logits"]["metrics"]["max_relative_error"] < 1e-4
    assert rows["logits"]["metrics"]["argmax_agreement"] == 1.0
    assert out.strip().endswith("PASSED") and "PASS  greedy tokens" in out


def test_check_fails_on_a_wrongly_mapped_weight(tmp_path, capsys, monkeypatch):
    folder, _ = tiny_models.make_llama(tmp_path / "llama")
    original = DecoderForCausalLM.map_weight

    def swapped(self, name, tensor):  # one layer's up projection loaded with its rows reversed
        if name == "model.layers.1.mlp.up_proj.weight":
            tensor = tensor.flip(0)
        return original(self, name, tensor)

    monkeypatch.setattr(DecoderForCausalLM, "map_weight", swapped)
    code, report, out = _check([str(folder)], tmp_path, capsys)
    assert code == 1 and not report["passed"]
    rows = {row["name"]: row for row in report["rows"]}
    assert rows["logits"]["status"] == "fail" and rows["logits"]["metrics"]["max_abs_error"] > 1e-3
    assert rows["tokenizer"]["status"] == "pass"  # the tokenizer is not at fault
    assert "FAIL  logits" in out and out.strip().endswith("FAILED")


def test_check_needs_remote_code_or_a_reference(tmp_path, capsys):
    folder, _ = tiny_models.make_internlm2(tmp_path / "internlm2")
    code, _, out = _check([str(folder)], tmp_path, capsys)
    assert code == 1
    assert "add --trust-remote-code, or --reference DIR" in out
