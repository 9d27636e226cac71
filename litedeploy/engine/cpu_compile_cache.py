"""Where the compiled CPU decode step keeps Inductor's on-disk cache, and whether it may compile.

The cache lives in the user's cache directory, one folder per CPU capability:
`$LITEDEPLOY_CACHE_DIR` (default `$XDG_CACHE_HOME/litedeploy`, else `~/.cache/litedeploy`)
`/inductor/<capability>/`. Inductor's cache key leaves out ATEN_CPU_CAPABILITY: kernels built
under AVX-512 and loaded under ATEN_CPU_CAPABILITY=avx2 computed NaNs, so each capability gets
its own folder. A user's own TORCHINDUCTOR_CACHE_DIR wins.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

CACHE_DIR_ENV = "LITEDEPLOY_CACHE_DIR"
SWITCH_ENV = "LITEDEPLOY_CPU_COMPILE"  # "0" keeps the CPU decode eager (test suites, debugging)
INDUCTOR_DIR_ENV = "TORCHINDUCTOR_CACHE_DIR"
# The oldest PyTorch whose compile off the main thread this project has run green. Under torch
# 2.11 (Python 3.12, Intel Xeon) Dynamo crashed (SIGSEGV in FakeTensorMode.__enter__) or hung
# while tracing the decode step in the background thread; torch.compile is documented as not
# thread-safe, so older versions stay eager unless LITEDEPLOY_CPU_COMPILE=1 asks for it.
MIN_TORCH_FOR_BACKGROUND_COMPILE = "2.13"


def litedeploy_cache_dir() -> Path:
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "litedeploy"


def inductor_cache_dir() -> Path:
    capability = torch.backends.cpu.get_cpu_capability().lower()
    return litedeploy_cache_dir() / "inductor" / capability


def point_inductor_at_cache() -> str:
    """Send Inductor's on-disk cache to our folder unless the user chose one; returns the folder
    in use. Inductor writes its own default into the environment on first use, so a value equal
    to that default is not the user's choice."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get(INDUCTOR_DIR_ENV)
    if current and os.path.abspath(current) != os.path.abspath(default_cache_dir()):
        return current
    folder = inductor_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[INDUCTOR_DIR_ENV] = str(folder)
    return str(folder)


def env_switch() -> bool | None:
    """LITEDEPLOY_CPU_COMPILE as set: False (off), True (on, even on an untested torch), or None."""
    value = os.environ.get(SWITCH_ENV, "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    return True if value in ("1", "true", "yes", "on") else None


def torch_compiles_in_background() -> bool:
    """Whether this PyTorch is one the background compile is known to work with."""
    from packaging.version import Version  # a dependency of transformers

    oldest = Version(MIN_TORCH_FOR_BACKGROUND_COMPILE).release
    return Version(torch.__version__).release[:len(oldest)] >= oldest  # 2.13 nightlies too


def off_reason(device: torch.device, eager_mode: bool, quant_bits: int, tp_size: int) -> str | None:
    """Why the compiled CPU decode cannot or must not run here; None when it may."""
    if device.type != "cpu":
        return "not a CPU engine"
    if eager_mode:
        return "--eager-mode"
    switch = env_switch()
    if switch is False:
        return f"{SWITCH_ENV}={os.environ[SWITCH_ENV]}"
    if switch is None and not torch_compiles_in_background():
        return (f"torch {torch.__version__} < {MIN_TORCH_FOR_BACKGROUND_COMPILE}: "
                f"{SWITCH_ENV}=1 compiles anyway")
    if quant_bits:
        return f"quantized KV cache (--quant-policy {quant_bits})"
    if tp_size != 1:
        return "--tp > 1"
    return None


def compiled_decode_of(engine):
    """The engine's CompiledCPUDecode, or None (GPU, TP, switched off)."""
    graphs = getattr(engine.runner, "graphs", None)
    return graphs if hasattr(graphs, "status_text") else None


def decode_status_text(engine) -> str | None:
    """For start-up lines on CPU: 'compiled (in 9.8 s)', 'eager while compiling in the
    background', 'eager (--eager-mode)'...; None on GPU."""
    if engine.device.type != "cpu":
        return None
    compiled = compiled_decode_of(engine)
    if compiled is not None:
        return compiled.status_text()
    reason = getattr(engine.runner, "cpu_compile_off_reason", None) or (
        "--tp > 1" if engine.config.tp > 1 else "off")
    return f"eager ({reason})"
