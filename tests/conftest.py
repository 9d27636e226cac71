"""Suite-wide settings."""

import os

# CPU engines compile their decode step in a background thread by default; the suite starts many
# engines on 2 cores, so it keeps them eager (servers started by tests inherit this too).
# tests/quant/test_cpu_compiled_decode.py switches it back on for its own engines.
os.environ.setdefault("LITEDEPLOY_CPU_COMPILE", "0")
