"""Prompts -> token ids for the front-ends (pipeline, server, terminal chat, Gradio).

The engine takes token ids (or raw text); the chat template is resolved here, from the loaded
tokenizer (a GGUF's template comes with its tokenizer) and the `--chat-template` override, and
each front-end holds one PromptEncoder next to its engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from litedeploy.chat.template import ChatTemplate
from litedeploy.errors import RequestError
from litedeploy.model_bundle import ModelBundle
from litedeploy.tokenizer import Tokenizer


@dataclass
class PromptEncoder:
    tokenizer: Tokenizer | None  # None with --load-format dummy and no tokenizer files
    template: ChatTemplate | None

    @classmethod
    def for_bundle(cls, bundle: ModelBundle, override: str | None = None) -> PromptEncoder:
        """Resolve the chat template of a loaded model; its stop words (the end-of-turn markers)
        join the bundle's default stop tokens, so every request stops at the end of a turn."""
        tokenizer = bundle.tokenizer
        if tokenizer is None:
            return cls(None, None)
        template = ChatTemplate.resolve(
            tokenizer, override, model_type=bundle.source.hf_config.get("model_type"))
        word_ids = (tokenizer.token_id(word) for word in template.stop_words)
        bundle.stop_token_ids = bundle.stop_token_ids | {i for i in word_ids if i is not None}
        return cls(tokenizer, template)

    @classmethod
    def for_engine(cls, engine) -> PromptEncoder:
        """For an LLMEngine or AsyncEngine: its bundle and its config's chat_template override."""
        engine = getattr(engine, "engine", engine)  # AsyncEngine wraps the LLMEngine
        return cls.for_bundle(engine.bundle, engine.config.chat_template)

    def encode(self, prompt: str | list[dict], do_preprocess: bool = True) -> list[int]:
        """Messages or a string -> token ids; a string goes through the chat template (as one
        user message) unless do_preprocess is False (then it is raw text with BOS)."""
        if self.tokenizer is None:
            raise RequestError("this engine was loaded without a tokenizer (--load-format dummy)")
        if isinstance(prompt, str) and not do_preprocess:
            return self.tokenizer.encode(prompt)
        return self.template.encode(self.tokenizer, prompt)
