"""Chat templates: messages -> prompt text -> token ids, plus the stop words of the format.

Every template is Jinja rendered by transformers' own chat-template renderer (the one behind
`apply_chat_template`), so a model's template renders here exactly as in transformers. Built-ins
cover models without a template; InternLM2's is LMDeploy's classic `internlm2` format.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from litedeploy.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

INTERNLM2_META_INSTRUCTION = (
    "You are an AI assistant whose name is InternLM (书生·浦语).\n"
    "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI "
    "Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM (书生·浦语) can understand and communicate fluently in the language chosen by the "
    "user such as English and 中文.\n"
)

# LMDeploy's internlm2: injected system block; `tool` renders as `environment`; a message named
# plugin/interpreter gets `name=<|plugin|>`; a final assistant message is continued, not closed.
# Tools: a `system name=<|plugin|>` message holding the functions as JSON, after the first system
# message; an assistant's tool_calls follow its content as `<|action_start|><|plugin|>` blocks.
_INTERNLM2 = """\
{%- set tools_at = 1 if messages[0]['role'] == 'system' else 0 -%}
{%- set ns = namespace(functions=[]) -%}
{%- for tool in tools or [] -%}
{%- set ns.functions = ns.functions + [tool['function'] if tool['function'] is defined else tool] -%}
{%- endfor -%}
{%- macro plugin_block() -%}
{{- '<|im_start|>system name=<|plugin|>\\n' + (ns.functions | tojson) + '<|im_end|>\\n' -}}
{%- endmacro -%}
{%- if messages[0]['role'] != 'system' -%}
{{- '<|im_start|>system\\n' + meta_instruction + '<|im_end|>\\n' -}}
{%- endif -%}
{%- for message in messages -%}
{%- if tools and loop.index0 == tools_at -%}{{- plugin_block() -}}{%- endif -%}
{%- set role = 'environment' if message['role'] == 'tool' else message['role'] -%}
{%- if message.get('name') in ['plugin', 'interpreter'] -%}
{{- '<|im_start|>' + role + ' name=<|' + message['name'] + '|>\\n' -}}
{%- else -%}
{{- '<|im_start|>' + role + '\\n' -}}
{%- endif -%}
{{- message['content'] -}}
{%- if role == 'assistant' -%}
{%- for call in message.get('tool_calls') or [] -%}
{%- set function = call['function'] if call['function'] is defined else call -%}
{%- set parameters = function['parameters'] if function['parameters'] is defined
    else function['arguments'] -%}
{{- '<|action_start|><|plugin|>\\n' -}}
{{- {'name': function['name'], 'parameters': parameters} | tojson -}}
{{- '<|action_end|>' -}}
{%- endfor -%}
{%- endif -%}
{%- if not (loop.last and role == 'assistant' and add_generation_prompt) -%}
{{- '<|im_end|>\\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if tools and messages | length == tools_at -%}{{- plugin_block() -}}{%- endif -%}
{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}
{{- '<|im_start|>assistant\\n' -}}
{%- endif -%}"""

_CHATML_BODY = """\
{%- for message in messages -%}
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"""

_QWEN2_SYSTEM = """\
{%- if messages[0]['role'] != 'system' -%}
{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}
{%- endif -%}
"""

_LLAMA3 = """\
{{- '<|begin_of_text|>' -}}
{%- for message in messages -%}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}
{{- message['content'] | trim + '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
{%- endif -%}"""

BUILTIN_TEMPLATES: dict[str, str] = {
    "internlm2": "{%- set meta_instruction = "
    + json.dumps(INTERNLM2_META_INSTRUCTION)
    + " -%}\n"
    + _INTERNLM2,
    "chatml": _CHATML_BODY,
    "qwen2": _QWEN2_SYSTEM + _CHATML_BODY,
    "llama3": _LLAMA3,
}

BUILTIN_STOP_WORDS: dict[str, list[str]] = {
    "internlm2": ["<|im_end|>", "<|action_end|>"],
    "chatml": ["<|im_end|>"],
    "qwen2": ["<|im_end|>"],
    "llama3": ["<|eot_id|>"],
}

# End-of-turn markers: a template that writes one of these ends each turn with it, so generation
# must stop there. Stop words of a tokenizer-provided template are the markers its text contains.
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|action_end|>")

# Which built-in to use for a model that ships no template, by model_type.
_DEFAULT_BY_MODEL_TYPE = {"internlm2": "internlm2", "internlm": "internlm2", "qwen2": "qwen2"}


@dataclass
class ChatTemplate:
    name: str
    source: str
    stop_words: list[str]
    # Variables the template may read, like apply_chat_template passes: bos_token, eos_token, ...
    template_vars: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def resolve(
        cls, tokenizer: Tokenizer, override: str | None = None, model_type: str | None = None
    ) -> ChatTemplate:
        """Pick the template: `override` (built-in name, .jinja or .json file), else the tokenizer's
        own, else a built-in for `model_type` (ChatML, with a warning, when none fits)."""
        template_vars = _special_token_vars(tokenizer)
        if override is not None:
            name, source, stop_words = _load_override(override)
        elif tokenizer.chat_template:
            name, source = "tokenizer", tokenizer.chat_template
            stop_words = _stop_words_in(source)
        else:
            name = _default_builtin(tokenizer, model_type)
            source, stop_words = BUILTIN_TEMPLATES[name], BUILTIN_STOP_WORDS[name]
        return cls(name, source, list(stop_words), template_vars)

    @property
    def renders_tools(self) -> bool:
        """Whether the template reads `tools` (else a caller must put them in a message)."""
        return "tools" in self.source

    @property
    def renders_tool_calls(self) -> bool:
        return "tool_calls" in self.source

    def render(self, messages: list[dict], add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template(
            conversations=[[_plain_message(message) for message in messages]],
            tools=tools or None,
            chat_template=self.source,
            add_generation_prompt=add_generation_prompt,
            **self.template_vars,
        )
        return rendered[0]

    def encode(
        self,
        tokenizer: Tokenizer,
        messages: list[dict] | str,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
    ) -> list[int]:
        """Render and tokenize; a plain string is one user message. BOS appears at most once."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        text = self.render(messages, add_generation_prompt, tools)
        # A template that writes bos_token itself gets no second BOS from the tokenizer.
        if tokenizer.bos_token and text.startswith(tokenizer.bos_token):
            return tokenizer.encode(text, add_bos=False)
        return tokenizer.encode(text)


def _load_override(override: str) -> tuple[str, str, list[str]]:
    if override in BUILTIN_TEMPLATES:
        return override, BUILTIN_TEMPLATES[override], BUILTIN_STOP_WORDS[override]
    path = Path(override)
    if path.suffix in (".jinja", ".json") and not path.is_file():
        raise ValueError(f"chat template file {override} does not exist")
    if path.suffix == ".jinja":
        source = path.read_text(encoding="utf-8")
        return path.stem, source, _stop_words_in(source)
    if path.suffix == ".json":
        return _load_json_template(path)
    raise ValueError(
        f"unknown chat template {override!r}: use one of the built-ins "
        f"({', '.join(sorted(BUILTIN_TEMPLATES))}), a .jinja file or a .json file"
    )


def _load_json_template(path: Path) -> tuple[str, str, list[str]]:
    """{"chat_template": ...} (a tokenizer_config.json works) or LMDeploy-style pieces."""
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"chat template file {path} is not valid JSON: {exc}") from exc
    if not isinstance(spec, dict):
        # A bad file is a user error (ValueError), not a programming one (TypeError).
        raise ValueError(f"chat template file {path} must hold a JSON object")  # noqa: TRY004
    if isinstance(spec.get("chat_template"), str):
        source = spec["chat_template"]
        return path.stem, source, spec.get("stop_words") or _stop_words_in(source)
    name = spec.get("model_name")
    if name in BUILTIN_TEMPLATES and not set(spec) & set(_LMDEPLOY_PIECES):
        stop_words = spec.get("stop_words") or BUILTIN_STOP_WORDS[name]
        return name, BUILTIN_TEMPLATES[name], stop_words
    if not set(spec) & set(_LMDEPLOY_PIECES):
        raise ValueError(
            f"chat template file {path} has neither 'chat_template' nor LMDeploy-style fields "
            f"({', '.join(_LMDEPLOY_PIECES)})"
        )
    source = _template_from_pieces(spec)
    return name or path.stem, source, spec.get("stop_words") or _stop_words_in(source)


# LMDeploy-style pieces with ChatML defaults for the ones a file leaves out.
_LMDEPLOY_PIECES = {
    "system": "<|im_start|>system\n",
    "meta_instruction": "",
    "eosys": "<|im_end|>\n",
    "user": "<|im_start|>user\n",
    "eoh": "<|im_end|>\n",
    "assistant": "<|im_start|>assistant\n",
    "eoa": "<|im_end|>",
    "separator": "\n",
    "tool": "<|im_start|>tool\n",
    "eotool": "<|im_end|>\n",
}


def _template_from_pieces(spec: dict) -> str:
    """A Jinja template equivalent to LMDeploy's BaseChatTemplate.messages2prompt."""
    p = {key: spec.get(key) or default for key, default in _LMDEPLOY_PIECES.items()}
    lit = {key: json.dumps(value, ensure_ascii=False) for key, value in p.items()}
    meta_block = ""
    if p["meta_instruction"]:
        meta_block = (
            "{%- if messages[0]['role'] != 'system' -%}"
            f"{{{{- {lit['system']} + {lit['meta_instruction']} + {lit['eosys']} -}}}}"
            "{%- endif -%}"
        )
    return (
        meta_block + "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}"
        f"{{{{- {lit['system']} + message['content'] + {lit['eosys']} -}}}}"
        "{%- elif message['role'] == 'assistant' -%}"
        f"{{{{- {lit['assistant']} + message['content'] + {lit['eoa']} + {lit['separator']} -}}}}"
        "{%- elif message['role'] == 'tool' -%}"
        f"{{{{- {lit['tool']} + message['content'] + {lit['eotool']} -}}}}"
        "{%- else -%}"
        f"{{{{- {lit['user']} + message['content'] + {lit['eoh']} -}}}}"
        "{%- endif -%}{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{- {lit['assistant']} -}}}}{{%- endif -%}}"
    )


def _default_builtin(tokenizer: Tokenizer, model_type: str | None) -> str:
    kind = (model_type or "").lower()
    if kind in _DEFAULT_BY_MODEL_TYPE:
        return _DEFAULT_BY_MODEL_TYPE[kind]
    if kind == "llama" and tokenizer.token_id("<|eot_id|>") is not None:
        return "llama3"
    # A base model without a template must still load (plain completions need none), so fall
    # back to ChatML rather than fail; say how to choose another.
    logger.warning(
        "the tokenizer has no chat template and model type %r has no default one; using "
        "'chatml'. Pass a chat template to change it: one of the built-ins (%s), a .jinja file "
        "or a .json file",
        model_type,
        ", ".join(sorted(BUILTIN_TEMPLATES)),
    )
    return "chatml"


def _stop_words_in(source: str) -> list[str]:
    return [marker for marker in END_OF_TURN_MARKERS if marker in source]


def _special_token_vars(tokenizer: Tokenizer) -> dict[str, Any]:
    """What apply_chat_template exposes to the template: the tokenizer's special-token strings."""
    if tokenizer.hf_tokenizer is not None:
        return dict(tokenizer.hf_tokenizer.special_tokens_map)
    return {
        key: value
        for key, value in (("bos_token", tokenizer.bos_token), ("eos_token", tokenizer.eos_token))
        if value is not None
    }


def _plain_message(message: dict) -> dict:
    """Drop None fields (as transformers does) and flatten [{"type": "text", ...}] content."""
    plain = {key: value for key, value in message.items() if value is not None}
    content = plain.get("content")
    if isinstance(content, list):
        plain["content"] = "".join(
            part.get("text", "") for part in content if part.get("type", "text") == "text"
        )
    return plain
