"""OpenAI request and response models (pydantic), and their translation to GenerationConfig.

Requests are strict: unknown fields, wrong types and features we cannot honour are rejected with a
400 that names the field, never silently ignored. Server defaults follow lmdeploy's api_server:
sampling on, temperature 0.7, top_p 1.0, top_k 40; temperature 0 means greedy.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from litedeploy.config import GenerationConfig
from litedeploy.serve.structured import GuidedFields
from litedeploy.serve.unicode_check import check_unicode

DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 1.0
DEFAULT_TOP_K = 40
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's and lmdeploy's default for /v1/completions
MAX_N = 128
MAX_TOP_LOGPROBS = 20
# Each stop string is searched in the text after every token: bound the work one request brings.
MAX_STOP_WORDS = 64
MAX_STOP_WORD_CHARS = 256
MAX_LOGIT_BIAS = 1024  # entries of one logit_bias map


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope, declared so /openapi.json (and schemathesis) know the 4xx/5xx."""

    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description} for status, description in (
        (400, "invalid request"), (401, "missing or wrong API key"), (404, "unknown model"),
        (408, "request body not sent in time"), (413, "request body too large"),
        (500, "generation failed"), (503, "overloaded or shutting down; see Retry-After"))}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        check_unicode(data)  # a lone surrogate: a clear 400, not the tokenizer's TypeError
        return data


def _unsupported(what: str, hint: str) -> ValueError:
    return ValueError(f"{what} is not supported by litedeploy; {hint}")


def _string_list(value: Any, name: str) -> list[str] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise ValueError(f"{name} must be a string or a list of strings")
    return items


class ChatMessage(_Strict):
    # "function": OpenAI's deprecated name of a tool result, rendered as "tool"
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    # a string, or a list of {"type": "text", "text": ...} parts
    content: Any = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[Any] | None = None

    @field_validator("content")
    @classmethod
    def _text_content(cls, content: Any) -> str | None:
        if content is None or isinstance(content, str):
            return content
        if not isinstance(content, list):
            # pydantic turns ValueError (not TypeError) into a validation error
            raise ValueError("content must be a string or a list of text parts")  # noqa: TRY004
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content part type {kind!r} is not supported; send "
                                 "{\"type\": \"text\", \"text\": \"...\"} parts only")
            texts.append(part["text"])
        return "".join(texts)

    @field_validator("tool_calls")
    @classmethod
    def _tool_calls(cls, tool_calls: list[Any] | None) -> list[dict] | None:
        """An assistant's past calls: [{"id", "type": "function", "function": {"name",
        "arguments": a JSON string}}], rendered through the chat template."""
        for call in tool_calls or ():
            function = call.get("function") if isinstance(call, dict) else None
            if not (isinstance(function, dict) and isinstance(function.get("name"), str)
                    and isinstance(function.get("arguments"), str | dict)):
                raise ValueError(  # noqa: TRY004 - pydantic reports ValueError as a 400
                    'each tool call is {"id": ..., "type": "function", "function": '
                    '{"name": ..., "arguments": "<JSON>"}}')
        return tool_calls

    def for_template(self) -> dict[str, Any]:
        """The dict the chat template renders; `developer` is OpenAI's newer name of `system`."""
        message = {"role": _TEMPLATE_ROLES.get(self.role, self.role),
                   "content": self.content or ""}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message

    @model_validator(mode="after")
    def _content_required(self):
        # as OpenAI: only an assistant (with tool calls) or a function result may have none
        if self.content is None and self.role not in ("assistant", "function"):
            raise ValueError(f"a {self.role!r} message needs content (a string or text parts)")
        return self


_TEMPLATE_ROLES = {"developer": "system", "function": "tool"}


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingRequest(_Strict, GuidedFields):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)  # lmdeploy extra; 0 = no top-k
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: Any = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    min_new_tokens: int | None = Field(None, ge=0)
    user: str | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: Any) -> list[str] | None:
        words = _string_list(stop, "stop")
        if words is None:
            return None
        if any(not word for word in words):
            raise ValueError("stop strings must not be empty")
        if len(words) > MAX_STOP_WORDS or any(len(w) > MAX_STOP_WORD_CHARS for w in words):
            raise ValueError(f"at most {MAX_STOP_WORDS} stop strings of at most "
                             f"{MAX_STOP_WORD_CHARS} characters each (got {len(words)})")
        return words

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias_ids(cls, logit_bias: dict[str, float] | None) -> dict[int, float] | None:
        """OpenAI's map of token-id strings to a bias in [-100, 100]; ids must be in the vocab
        (the engine checks that)."""
        if not logit_bias:
            return None
        if len(logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias has {len(logit_bias)} entries; at most {MAX_LOGIT_BIAS}")
        if not all(key.isascii() and key.isdigit() for key in logit_bias):
            raise ValueError("logit_bias keys must be token ids written as decimal strings")
        if not all(-100.0 <= bias <= 100.0 for bias in logit_bias.values()):
            raise ValueError("logit_bias values must be between -100 and 100")
        return {int(key): float(bias) for key, bias in logit_bias.items()}

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def generation_config(self, max_new_tokens: int | None,
                          num_logprobs: int | None) -> GenerationConfig:
        temperature = DEFAULT_TEMPERATURE if self.temperature is None else self.temperature
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0.0,  # lmdeploy's server samples unless temperature is 0
            temperature=temperature,
            top_p=DEFAULT_TOP_P if self.top_p is None else self.top_p,
            top_k=DEFAULT_TOP_K if self.top_k is None else self.top_k,
            min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            random_seed=self.seed,
            stop_words=self.stop,
            min_new_tokens=self.min_new_tokens,
            ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
            logprobs=num_logprobs,
            logit_bias=self.logit_bias,
            guided=self.guided,  # response_format / guided_* (serve/structured.py)
        )


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    store: bool | None = None  # OpenAI's stored completions: accepted, nothing is stored
    metadata: dict[str, str] | None = None  # tags for stored completions: accepted, ignored

    @model_validator(mode="after")
    def _honourable(self):
        # tools, tool_choice and parallel_tool_calls are checked by serve/tool_chat.py
        if self.functions or self.function_call not in (None, "none"):
            raise _unsupported("functions / function_call (deprecated by OpenAI)",
                               "send `tools` and `tool_choice` instead")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def to_generation_config(self) -> GenerationConfig:
        max_new = self.max_completion_tokens or self.max_tokens
        return self.generation_config(max_new, (self.top_logprobs or 0) if self.logprobs else None)


class CompletionRequest(_SamplingRequest):
    # a string, a list of strings, a list of token ids, or a list of token-id lists
    prompt: Any
    # 0 with echo: the prompt (and its logprobs) only
    max_tokens: int | None = Field(DEFAULT_COMPLETION_MAX_TOKENS, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # vLLM's extra
    suffix: str | None = None
    best_of: int | None = None
    response_format: dict[str, Any] | None = None  # json_object / json_schema, as vLLM takes

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, prompt: Any) -> list[str | list[int]]:
        """Normalized to a list of prompts, each a string or a list of token ids."""
        def is_ids(value: Any) -> bool:
            return isinstance(value, list) and bool(value) and all(
                isinstance(item, int) and not isinstance(item, bool) for item in value)

        if isinstance(prompt, str):
            return [prompt]
        if is_ids(prompt):
            return [prompt]
        if isinstance(prompt, list) and prompt and all(
                isinstance(item, str) or is_ids(item) for item in prompt):
            return prompt
        raise ValueError("prompt must be a string, a list of strings, a list of token ids, "
                         "or a list of token-id lists (none empty)")

    @model_validator(mode="after")
    def _honourable(self):
        if self.suffix:
            raise _unsupported("suffix", "insertion (fill-in-the-middle) needs a model trained "
                                         "for it; remove `suffix`")
        if self.best_of not in (None, 1):
            raise _unsupported("best_of", "use n to get several completions")
        if self.max_tokens == 0 and not self.echo and self.prompt_logprobs is None:
            raise ValueError("max_tokens 0 generates nothing: it needs echo: true (the prompt "
                             "and its logprobs only) or prompt_logprobs")
        return self

    def to_generation_config(self) -> GenerationConfig:
        gen = self.generation_config(self.max_tokens, self.logprobs)
        gen.prompt_logprobs = self.prompt_logprobs
        if self.echo and self.logprobs is not None:  # echoed prompt tokens carry logprobs too
            gen.prompt_logprobs = max(self.logprobs, self.prompt_logprobs or 0)
        if self.max_tokens == 0 and gen.prompt_logprobs is None:
            gen.prompt_logprobs = 0  # the engine runs prefill-only requests for these only
        return gen


class EncodeRequest(_Strict):
    input: Any
    do_preprocess: bool = False  # True: apply the chat template to each string first
    add_bos: bool = True  # False: no BOS even where the tokenizer adds one

    @field_validator("input")
    @classmethod
    def _inputs(cls, value: Any) -> list[str] | str:
        if _string_list(value, "input") is None:  # found by the schemathesis fuzz run
            raise ValueError("input must be a string or a list of strings")
        return value


# ---- responses --------------------------------------------------------------------------------
class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: the first echoed prompt token
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprobEntry(BaseModel):
    """vLLM's prompt_logprobs entry: one per token id (the prompt's own and the top ones)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None when the reply is tool calls only
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None
    # vLLM's: with prompt_logprobs, per prompt token {token id: entry}, the first None
    prompt_logprobs: list[dict[str, PromptLogprobEntry] | None] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "litedeploy"
    root: str
    parent: str | None = None
    max_model_len: int
    device: str  # litedeploy extra: where the engine runs (cpu, cuda)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class EncodeResponse(BaseModel):
    input_ids: list[int] | list[list[int]]
    length: int | list[int]
