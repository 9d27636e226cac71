"""InternLM2's plugin format: `text<|action_start|><|plugin|>\n{"name": ..., "parameters":
{...}}<|action_end|>`. The markers are special tokens: the request keeps them in the text
(skip_special_tokens off) and the parser takes them out of the content. `<|action_end|>` is a
stop word of the format, so the output usually ends right after the JSON. A code-interpreter
action (`<|action_start|><|interpreter|>`) is not a function call and stays in the content.
"""

from __future__ import annotations

import json

from litedeploy.serve.tools.marked import MarkedCallParser


class InternLM2ToolParser(MarkedCallParser):
    name = "internlm2"
    opener = "<|action_start|><|plugin|>"
    closer = "<|action_end|>"
    needs_special_tokens = True
    # A Hugging Face InternLM2 template writes `<|im_start|>{role}\n`: these roles give the
    # documented headers `system name=<|plugin|>` and `environment name=<|plugin|>`.
    call_separator = ""
    tools_role = "system name=<|plugin|>"
    tool_result_role = "environment name=<|plugin|>"

    @staticmethod
    def system_prompt(tools: list[dict]) -> str:
        functions = [tool.get("function", tool) for tool in tools]
        return json.dumps(functions, ensure_ascii=False)

    @staticmethod
    def format_call(name: str, arguments: object) -> str:
        call = json.dumps({"name": name, "parameters": arguments}, ensure_ascii=False)
        return f"<|action_start|><|plugin|>\n{call}<|action_end|>"
