"""Tokenizer endpoints with vLLM's shapes (/tokenize, /detokenize, /tokenizer_info) and
GET /v1/models/{id} (the openai client's `models.retrieve`).

lm-evaluation-harness's `local-completions` finds /tokenizer_info and /tokenize on its own and
then tokenizes through the server, so an evaluation needs no tokenizer download.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, model_validator

from litedeploy.errors import RequestError
from litedeploy.serve import protocol as p
from litedeploy.serve.errors import APIError
from litedeploy.serve.logprobs_format import token_texts

if TYPE_CHECKING:
    from litedeploy.serve.state import OpenAIServer

MAX_DETOKENIZE_TOKENS = 1 << 20


class TokenizeRequest(BaseModel):
    """vLLM's TokenizeCompletionRequest (`prompt`) or TokenizeChatRequest (`messages`)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    prompt: str | None = None
    messages: list[p.ChatMessage] | None = Field(None, min_length=1)
    # None: True for a prompt (the tokenizer's BOS rule), ignored for messages, whose ids are
    # exactly what a chat request feeds the model (the template decides about BOS)
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt (a string) or messages, not both")
        if self.continue_final_message:
            raise ValueError("continue_final_message is not supported by litedeploy")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    tokens: list[int] = Field(max_length=MAX_DETOKENIZE_TOKENS)


class DetokenizeResponse(BaseModel):
    prompt: str


def _tokenizer(server: OpenAIServer) -> Any:
    tokenizer = server.engine.tokenizer
    if tokenizer is None:
        raise APIError(400, "this server was started without a tokenizer (--load-format dummy)")
    return tokenizer


def _chat_template(server: OpenAIServer) -> Any:
    prompts = getattr(server, "prompts", None)  # the server's PromptEncoder, where it has one
    return prompts.template if prompts is not None else server.engine.chat_template


def _tokenize(server: OpenAIServer, body: TokenizeRequest) -> list[int]:
    from jinja2 import TemplateError

    tokenizer = _tokenizer(server)
    if body.prompt is not None:
        add_bos = None if body.add_special_tokens in (None, True) else False
        return tokenizer.encode(body.prompt, add_bos=add_bos)
    messages = [message.for_template() for message in body.messages]
    try:
        return _chat_template(server).encode(tokenizer, messages, body.add_generation_prompt)
    except (TemplateError, TypeError, KeyError) as exc:
        raise APIError(400, f"the chat template cannot render these messages: {exc}",
                       param="messages") from exc


def model_card(server: OpenAIServer) -> p.ModelCard:
    engine = server.engine.engine
    return p.ModelCard(id=server.settings.model_name, created=server.created,
                       root=server.settings.model_name, max_model_len=engine.session_len,
                       device=str(engine.device))


def add_tokenize_routes(app: FastAPI, server: OpenAIServer) -> None:
    @app.get("/v1/models/{model_id:path}", response_model=p.ModelCard,
             responses=p.ERROR_RESPONSES)
    async def retrieve_model(model_id: str) -> p.ModelCard:
        server.check_model(model_id)
        return model_card(server)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=p.ERROR_RESPONSES)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        if body.model is not None:
            server.check_model(body.model)
        ids = _tokenize(server, body)
        strs = None
        if body.return_token_strs:
            texts = token_texts(_tokenizer(server))
            strs = [texts.text(token_id) for token_id in ids]
        return TokenizeResponse(count=len(ids), max_model_len=server.engine.engine.session_len,
                                tokens=ids, token_strs=strs)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=p.ERROR_RESPONSES)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        if body.model is not None:
            server.check_model(body.model)
        tokenizer = _tokenizer(server)
        vocab_size = server.engine.engine.model_config.vocab_size
        if any(not 0 <= token_id < vocab_size for token_id in body.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab_size})", param="tokens")
        try:
            text = tokenizer.decode(body.tokens, skip_special_tokens=False)
        except (RequestError, ValueError, OverflowError, IndexError) as exc:
            raise APIError(400, f"cannot decode these tokens: {exc}", param="tokens") from exc
        return DetokenizeResponse(prompt=text)

    @app.get("/tokenizer_info", responses=p.ERROR_RESPONSES)
    async def tokenizer_info() -> dict[str, Any]:
        """vLLM's tokenizer_info: the special tokens and chat template a client needs."""
        tokenizer = _tokenizer(server)
        hf = tokenizer.hf_tokenizer
        return {
            "tokenizer_class": type(hf).__name__ if hf is not None else "SentencePiece",
            "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token,
            "pad_token": getattr(hf, "pad_token", None),
            "add_bos_token": tokenizer.add_bos,
            "vocab_size": tokenizer.vocab_size,
            "model_max_length": server.engine.engine.session_len,
            "chat_template": _chat_template(server).source,
        }
