"""`litedeploy --version`, `litedeploy list` and `litedeploy check_env`."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

from litedeploy import __version__
from litedeploy.chat.template import BUILTIN_TEMPLATES
from litedeploy.cli.main import main
from litedeploy.models.registry import MODEL_REGISTRY
from tests.helpers.subprocess_env import repo_env

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_version_from_the_entry_point():
    result = subprocess.run([sys.executable, "-m", "litedeploy", "--version"], cwd=REPO_ROOT,
                            env=repo_env(),
                            capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"litedeploy {__version__}"


def test_list_shows_architectures_and_templates(capsys):
    assert main(["list"]) == 0
    lines = [line.split()[0] for line in capsys.readouterr().out.splitlines()
             if line.startswith("  ")]
    assert lines == sorted(MODEL_REGISTRY) + sorted(BUILTIN_TEMPLATES)


def _rows(text: str) -> dict[str, str]:
    return {line.split(maxsplit=1)[0]: line.split(maxsplit=1)[1] for line in text.splitlines()}


def _expected_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def test_check_env_reports_versions_and_devices(capsys):
    assert main(["check_env"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows["litedeploy"] == __version__
    assert rows["python"].startswith(platform.python_version())
    # the installed distributions' versions (a local build's "+cu130" may be in __version__ only)
    assert rows["torch"] == _expected_version("torch")
    assert rows["transformers"] == _expected_version("transformers")
    for name in ("triton", "gradio", "fastapi"):
        assert rows[name] == _expected_version(name)
    assert rows["CPU"].startswith(f"{os.cpu_count()} cores")
    assert "GiB total" in rows["RAM"]
    if torch.cuda.is_available():
        assert rows["cuda:0"].startswith(torch.cuda.get_device_name(0))
        assert "GiB total" in rows["cuda:0"]
    else:
        assert rows["CUDA"].startswith("not available")
