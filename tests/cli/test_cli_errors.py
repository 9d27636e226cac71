"""Bad input on the command line: one clear line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from litedeploy.cli.main import main
from tests.helpers.subprocess_env import repo_env

REPO_ROOT = Path(__file__).resolve().parents[2]


def _litedeploy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "litedeploy", *args], cwd=REPO_ROOT,
                          env=repo_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
                          timeout=120)


@pytest.mark.parametrize("flag, value", [("--cache-max-entry-count", "2"), ("--tp", "0"),
                                         ("--max_new_tokens", "zero")])
def test_bad_flag_value_is_one_line_and_exit_2(flag, value):
    result = _litedeploy("chat", flag, value)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("litedeploy chat: error: argument")
    assert flag.replace("_", "-") in lines[0] and value in lines[0]
    assert result.stdout == ""


def test_missing_model_path_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    result = _litedeploy("chat", str(missing), "--max_new_tokens", "8")  # lmdeploy's spelling
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last_line = result.stderr.splitlines()[-1]
    assert last_line.startswith("litedeploy: error:") and str(missing) in last_line
    assert result.stdout == ""


def test_bad_generation_value_fails_before_loading(capsys):
    assert main(["chat", "--temperature", "5"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "litedeploy: error: temperature must be in [0, 2], got 5.0"


def test_foo_bar_spelling_is_accepted(tmp_path, capsys):
    # parsed (else argparse would exit), then the missing path stops the run before loading
    assert main(["chat", str(tmp_path / "absent"), "--max_new_tokens", "8",
                 "--cache_max_tokens", "8192", "--enable_prefix_caching"]) == 2
    assert str(tmp_path / "absent") in capsys.readouterr().err


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["chat", "--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # undo the help's line wrapping
    assert "--cache-max-entry-count CACHE_MAX_ENTRY_COUNT" in help_text
    for default in ("(default: 0.8)", "(default: 64)", "(default: 8192)"):
        assert default in help_text
    # the chat serves one conversation: its KV cache is sized for one session
    assert "max sequences in one step (default: 1)" in help_text
    assert "an empty line ends your input" in help_text
    assert "`end` starts a new session" in help_text
