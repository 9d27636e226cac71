"""The Python API, mirroring lmdeploy: `pipeline(model_path)(prompts, gen_config=...)`."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

from litedeploy.chat.prompt import PromptEncoder
from litedeploy.chat.structured import ResponseFormat, guided_from_response_format
from litedeploy.config import EngineConfig, GenerationConfig
from litedeploy.engine.engine import LLMEngine
from litedeploy.engine.request import RequestOutput

Prompt = str | list[dict]


@dataclass
class Response:
    text: str
    generate_token_len: int
    input_token_len: int
    finish_reason: str | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None
    index: int = 0
    tool_calls: list[dict] | None = None  # chat(..., tools=...): the calls, OpenAI's form


@dataclass
class Session:
    """A conversation: the history is re-sent each turn; prefix caching makes that cheap."""

    session_id: int
    messages: list[dict] = field(default_factory=list)
    response: Response | None = None

    def close(self) -> None:
        self.messages.clear()
        self.response = None


class Pipeline:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.prompts = PromptEncoder.for_engine(engine)  # the chat template: ours, not the engine's
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def _encode(self, prompt: Prompt, do_preprocess: bool) -> list[int]:
        return self.prompts.encode(prompt, do_preprocess)

    def __call__(self, prompts: Prompt | list[Prompt], gen_config: GenerationConfig | None = None,
                 do_preprocess: bool = True, response_format: ResponseFormat = None,
                 ) -> Response | list[Response]:
        """`response_format`: OpenAI's {"type": "json_object"} / {"type": "json_schema", ...},
        a pydantic model class or a GuidedDecoding: the text then follows it (structured
        output; gen_config.guided does the same)."""
        single = isinstance(prompts, str) or (
            bool(prompts) and isinstance(prompts[0], dict))
        batch = [prompts] if single else list(prompts)
        responses = [Response("", 0, 0, None, index=i) for i in range(len(batch))]
        gen_config = with_response_format(gen_config, response_format)
        for delta in self.stream_infer(batch, gen_config, do_preprocess):
            total = responses[delta.index]
            total.text += delta.text
            total.token_ids += delta.token_ids
            if delta.logprobs is not None:
                total.logprobs = (total.logprobs or []) + delta.logprobs
            total.finish_reason = delta.finish_reason
            total.input_token_len = delta.input_token_len
            total.generate_token_len = delta.generate_token_len
        return responses[0] if single else responses

    infer = __call__

    def stream_infer(self, prompts: Prompt | list[Prompt],
                     gen_config: GenerationConfig | None = None,
                     do_preprocess: bool = True) -> Iterator[Response]:
        """Yields partial Responses (`text` is the delta; `index` tells which prompt)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict)):
            prompts = [prompts]
        gen = gen_config or GenerationConfig()
        index_of: dict[str, int] = {}
        for index, prompt in enumerate(prompts):
            request_id = f"pipe-{next(self._ids)}"
            self.engine.add_request(request_id, self._encode(prompt, do_preprocess), gen)
            index_of[request_id] = index
        pending = set(index_of)
        try:
            while pending:
                for out in self.engine.step():
                    if out.request_id not in index_of:
                        continue
                    if out.finished:
                        pending.discard(out.request_id)
                    yield _to_response(out, index_of[out.request_id])
        finally:
            for request_id in pending:  # the consumer stopped early: free the blocks
                self.engine.abort(request_id)
            while self.engine.has_unfinished() and pending:
                self.engine.step()
                pending.clear()

    def session(self) -> Session:
        return Session(next(self._ids))

    def chat(self, prompt: str | dict | list[dict], session: Session | None = None,
             gen_config: GenerationConfig | None = None, tools: list[dict] | None = None,
             tool_choice: str | dict | None = None,
             response_format: ResponseFormat = None) -> Session:
        """One turn. `prompt`: the user's text, or messages to append (e.g. a tool result,
        {"role": "tool", "tool_call_id": ..., "content": ...}). `tools` (OpenAI's format): the
        model may call them; the calls are in `session.response.tool_calls`."""
        gen_config = with_response_format(gen_config, response_format)
        session = session or self.session()
        new = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else (
            [prompt] if isinstance(prompt, dict) else list(prompt))
        session.messages += new
        if tools or tool_choice is not None or any(
                m.get("tool_calls") or m["role"] == "tool" for m in session.messages):
            from litedeploy.serve.tools.pipeline import chat_with_tools

            response = chat_with_tools(self, session.messages, gen_config, tools, tool_choice)
        else:
            response = self(list(session.messages), gen_config)
        reply = {"role": "assistant", "content": response.text}
        if response.tool_calls:
            reply["tool_calls"] = response.tool_calls
        session.messages.append(reply)
        session.response = response
        return session

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def with_response_format(gen: GenerationConfig | None,
                         response_format: ResponseFormat) -> GenerationConfig | None:
    guided = guided_from_response_format(response_format)
    if guided is None:
        return gen
    return dataclasses.replace(gen or GenerationConfig(), guided=guided)


def _to_response(out: RequestOutput, index: int) -> Response:
    return Response(out.text, out.generate_token_len, out.input_token_len, out.finish_reason,
                    list(out.token_ids), out.logprobs, index)


def pipeline(model_path: str | None = None, backend_config: EngineConfig | None = None,
             chat_template_config: str | None = None, log_level: str = "WARNING",
             **kwargs) -> Pipeline:
    """Load a model: a Hugging Face folder, a GGUF file, a hub id ("org/name", with lmdeploy's
    `revision=` / `download_dir=` and our `gguf_file=`), or None = the embedded default."""
    hub = {key: kwargs.pop(key) for key in ("revision", "download_dir", "gguf_file")
           if key in kwargs}
    if model_path and hub:
        from litedeploy.hub import resolve_model

        model_path = resolve_model(model_path, hub.get("revision"), hub.get("gguf_file"),
                                   hub.get("download_dir"))
    config = backend_config or EngineConfig(**kwargs)
    if chat_template_config is not None:
        config.chat_template = chat_template_config
    return Pipeline(LLMEngine.from_pretrained(model_path, config))
