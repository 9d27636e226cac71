"""Structured-output request fields: OpenAI's `response_format` and vLLM's `guided_*` extras,
turned into one GuidedDecoding (the engine compiles and enforces it)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, PrivateAttr, field_validator, model_validator

from litedeploy.chat.structured import guided_from_response_format, schema_from_text
from litedeploy.config import GuidedDecoding

MAX_SPEC_CHARS = 100_000  # a schema, pattern or grammar larger than this is refused (400)


class GuidedFields(BaseModel):
    """vLLM's extra fields (at most one per request, and not with a JSON response_format)."""

    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # accepted for vLLM clients; one backend here
    _guided: GuidedDecoding | None = PrivateAttr(None)

    @field_validator("guided_regex", "guided_grammar")
    @classmethod
    def _not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value:
            raise ValueError("guided_regex and guided_grammar must not be empty")
        return value

    @field_validator("guided_choice")
    @classmethod
    def _choices(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or not all(value)):
            raise ValueError("guided_choice must be a non-empty list of non-empty strings")
        return value

    @model_validator(mode="after")
    def _one_constraint(self):
        # response_format is a field of the request models that take it (chat, completions)
        self._guided = self.guided_decoding(getattr(self, "response_format", None))
        return self

    @property
    def guided(self) -> GuidedDecoding | None:
        return self._guided

    def guided_decoding(self, response_format: dict[str, Any] | None) -> GuidedDecoding | None:
        """The one constraint this request asks for, or None; ValueError (-> 400) otherwise."""
        found = [g for g in (guided_from_response_format(response_format), *self._extras()) if g]
        if len(found) > 1:
            raise ValueError("ask for one structured output at a time: response_format "
                             "json_object/json_schema, guided_json, guided_regex, "
                             "guided_choice or guided_grammar")
        if found and len(found[0].spec or "") > MAX_SPEC_CHARS:
            raise ValueError(f"the {found[0].kind} constraint is longer than "
                             f"{MAX_SPEC_CHARS} characters")
        return found[0] if found else None

    def _extras(self) -> list[GuidedDecoding | None]:
        schema = self.guided_json
        if isinstance(schema, str):
            schema = schema_from_text(schema, "guided_json")
        return [
            GuidedDecoding("json_schema", json.dumps(schema)) if schema is not None else None,
            GuidedDecoding("regex", self.guided_regex) if self.guided_regex else None,
            GuidedDecoding("choice", json.dumps(self.guided_choice))
            if self.guided_choice else None,
            GuidedDecoding("grammar", self.guided_grammar) if self.guided_grammar else None,
        ]
