"""Tool calling: one parser per model family, picked by model type or `--tool-call-parser`.

Pure Python (no server libraries), so the pipeline's `chat(..., tools=...)` uses it too.
"""

from __future__ import annotations

from litedeploy.serve.tools.base import ToolCall, ToolCallDelta, ToolCallParser
from litedeploy.serve.tools.hermes import HermesToolParser
from litedeploy.serve.tools.internlm2 import InternLM2ToolParser
from litedeploy.serve.tools.llama3 import Llama3ToolParser

TOOL_PARSERS: dict[str, type[ToolCallParser]] = {
    "internlm2": InternLM2ToolParser,
    "llama3": Llama3ToolParser,
    "hermes": HermesToolParser,
}
# lmdeploy's and vLLM's names for the same formats
_ALIASES = {"internlm": "internlm2", "qwen": "hermes", "qwen2": "hermes", "qwen2d5": "hermes",
            "llama3_json": "llama3"}
_BY_MODEL_TYPE = {"internlm2": "internlm2", "internlm": "internlm2", "llama": "llama3",
                  "qwen2": "hermes"}


def parser_names() -> list[str]:
    return sorted(TOOL_PARSERS)


def parser_choices() -> list[str]:
    """What --tool-call-parser accepts: our names and lmdeploy's / vLLM's for the same formats."""
    return parser_names() + sorted(_ALIASES)


def resolve_parser(override: str | None, model_type: str | None) -> type[ToolCallParser] | None:
    """The parser named by `override`, else the one of the model type (None: no known format).
    An unknown name is a ValueError that lists the choices."""
    if override is not None:
        name = _ALIASES.get(override, override)
        if name not in TOOL_PARSERS:
            raise ValueError(f"unknown tool-call parser {override!r}; choose one of "
                             f"{', '.join(parser_names())}")
        return TOOL_PARSERS[name]
    name = _BY_MODEL_TYPE.get((model_type or "").lower())
    return TOOL_PARSERS[name] if name else None


__all__ = ["TOOL_PARSERS", "ToolCall", "ToolCallDelta", "ToolCallParser", "parser_choices",
           "parser_names", "resolve_parser"]
