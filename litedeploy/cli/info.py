"""`litedeploy list` (supported architectures, built-in chat templates) and `litedeploy check_env`
(versions and devices, for bug reports)."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from importlib import metadata

from litedeploy.cli.args import HelpFormatter

# packages whose versions matter for bug reports; optional ones may be absent
_PACKAGES = ("torch", "transformers", "tokenizers", "triton", "gguf", "fastapi", "gradio",
             "prompt_toolkit")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    listing = subparsers.add_parser(
        "list", help="supported model architectures and built-in chat templates",
        description="Supported model architectures (config.json `architectures[0]`) and the "
                    "built-in chat templates usable with --chat-template.",
        formatter_class=HelpFormatter)
    listing.set_defaults(run=run_list)
    check_env = subparsers.add_parser(
        "check_env", help="versions of python and key packages, devices and their memory",
        description="Print versions of python and key packages and the devices with their "
                    "memory: paste this into bug reports.",
        formatter_class=HelpFormatter)
    check_env.set_defaults(run=run_check_env)


def run_list(args: argparse.Namespace) -> int:
    from litedeploy.chat.template import BUILTIN_TEMPLATES
    from litedeploy.models.registry import MODEL_REGISTRY

    print("Supported architectures:")
    for architecture, model_class in sorted(MODEL_REGISTRY.items()):
        print(f"  {architecture:<24} ({model_class.__module__})")
    print("Built-in chat templates (--chat-template NAME):")
    for name in sorted(BUILTIN_TEMPLATES):
        print(f"  {name}")
    return 0


def run_check_env(args: argparse.Namespace) -> int:
    from litedeploy import __version__

    rows = [("litedeploy", __version__),
            ("python", f"{platform.python_version()} ({sys.executable})"),
            ("platform", platform.platform())]
    rows += [(name, package_version(name)) for name in _PACKAGES]
    rows += device_rows()
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def package_version(name: str) -> str:
    """The installed distribution's version, without importing it (gradio takes seconds)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def device_rows() -> list[tuple[str, str]]:
    rows = [("CPU", f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}"),
            ("RAM", _ram_text())]
    try:
        import torch
    except ImportError:
        return rows + [("CUDA", "torch not installed")]
    if not torch.cuda.is_available():
        return rows + [("CUDA", "not available (CPU only)")]
    rows.append(("CUDA", f"{torch.version.cuda}, {torch.cuda.device_count()} device(s)"))
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        free_bytes, total_bytes = torch.cuda.mem_get_info(index)
        memory = f"{total_bytes / 2**30:.1f} GiB total, {free_bytes / 2**30:.1f} GiB free"
        name = f"{props.name}, compute {props.major}.{props.minor}"
        rows.append((f"cuda:{index}", f"{name}, {memory}"))
    return rows


def _ram_text() -> str:
    fields = _meminfo_kib()
    if "MemTotal" not in fields:
        return "unknown"
    total_gib = fields["MemTotal"] / 2**20
    available = fields.get("MemAvailable")
    if available is None:
        return f"{total_gib:.1f} GiB total"
    return f"{total_gib:.1f} GiB total, {available / 2**20:.1f} GiB available"


def _meminfo_kib() -> dict[str, int]:
    try:
        with open("/proc/meminfo") as meminfo:
            return {line.split(":")[0]: int(line.split()[1]) for line in meminfo}
    except (OSError, ValueError, IndexError):
        return {}
