"""Hermes / Qwen2 format: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one
block per call, content before them."""

from __future__ import annotations

import json

from litedeploy.serve.tools.marked import MarkedCallParser


class HermesToolParser(MarkedCallParser):
    name = "hermes"
    opener = "<tool_call>"
    closer = "</tool_call>"

    @staticmethod
    def system_prompt(tools: list[dict]) -> str:
        """For a chat template that does not render tools itself (Qwen2.5's wording)."""
        listing = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
        return (
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{listing}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments "
            "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
        )

    @staticmethod
    def format_call(name: str, arguments: object) -> str:
        call = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
        return f"<tool_call>\n{call}\n</tool_call>"
