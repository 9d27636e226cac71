"""Llama 3.1/3.2 JSON tool calls: the whole reply is `{"name": ..., "parameters": {...}}`
(several joined by `;`), maybe after `<|python_tag|>`; any other reply is content."""

from __future__ import annotations

import json

from litedeploy.serve.tools.sequence import JsonSequenceParser


class Llama3ToolParser(JsonSequenceParser):
    name = "llama3"
    opener = "<|python_tag|>"
    separator = ";"

    @staticmethod
    def system_prompt(tools: list[dict]) -> str:
        """For a template that does not render tools (Llama 3.1's JSON tool-calling wording)."""
        listing = "\n\n".join(json.dumps(tool, indent=4, ensure_ascii=False) for tool in tools)
        return (
            "Given the following functions, please respond with a JSON for a function call with "
            "its proper arguments that best answers the given prompt.\n\n"
            'Respond in the format {"name": function name, "parameters": dictionary of argument '
            "name and its value}. Do not use variables.\n\n" + listing
        )

    @staticmethod
    def format_call(name: str, arguments: object) -> str:
        return json.dumps({"name": name, "parameters": arguments}, ensure_ascii=False)
