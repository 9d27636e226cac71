"""Tool calling for the Python pipeline: `pipe.chat(messages, tools=[...])`, with the same
rendering, grammar and parsers as the server."""

from __future__ import annotations

import dataclasses
import itertools

from litedeploy.config import GenerationConfig
from litedeploy.serve.tools import resolve_parser
from litedeploy.serve.tools.plan import ToolPlan, encode_with_tools, finish_reason

_ids = itertools.count()


def chat_with_tools(pipe, messages: list[dict], gen_config: GenerationConfig | None,
                    tools: list[dict] | None, tool_choice: object = None,
                    tool_call_parser: str | None = None):
    """Run one assistant turn; returns the pipeline's Response with `text` the content and
    `tool_calls` the calls (OpenAI's form), finish_reason "tool_calls" when it called."""
    from litedeploy.api import Response

    model_type = pipe.engine.bundle.source.hf_config.get("model_type")
    parser_cls = resolve_parser(tool_call_parser, model_type)
    plan = ToolPlan.build(tools, tool_choice, None, parser_cls)
    gen = dataclasses.replace(gen_config or GenerationConfig())
    if plan is not None:
        gen.guided = plan.guided() or gen.guided
        gen.skip_special_tokens = gen.skip_special_tokens and not plan.keeps_special_tokens
    prompt_ids = encode_with_tools(pipe.prompts, messages, plan, parser_cls)
    request_id = f"pipe-tools-{next(_ids)}"
    pipe.engine.add_request(request_id, prompt_ids, gen)
    response = Response("", 0, 0, None)
    try:
        while response.finish_reason is None:
            for out in pipe.engine.step():
                if out.request_id != request_id:
                    continue
                response.text += out.text
                response.token_ids += out.token_ids
                response.input_token_len = out.input_token_len
                response.generate_token_len = out.generate_token_len
                if out.finished:
                    response.finish_reason = out.finish_reason or "stop"
    finally:
        if response.finish_reason is None:  # interrupted: free the blocks
            pipe.engine.abort(request_id)
    parser = plan.new_parser() if plan else None
    if parser is not None:
        content, calls = parser.parse(response.text)
        response.text = content
        response.tool_calls = [call.to_openai() for call in calls] or None
        response.finish_reason = finish_reason(response.finish_reason, bool(calls))
    return response
