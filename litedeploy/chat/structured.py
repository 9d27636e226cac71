"""OpenAI's `response_format` (and a pydantic model class) -> the engine's GuidedDecoding.

Shared by the OpenAI server (serve/structured.py), `pipeline()` and `litedeploy chat --json`.
"""

from __future__ import annotations

import json
from typing import Any

from litedeploy.config import GuidedDecoding

ResponseFormat = dict | type | GuidedDecoding | None


def guided_from_response_format(response_format: ResponseFormat) -> GuidedDecoding | None:
    """{"type": "text" | "json_object" | "json_schema", ...} as OpenAI takes it, a pydantic
    model class (its JSON schema), or a GuidedDecoding as is. ValueError says what is wrong."""
    if response_format is None or isinstance(response_format, GuidedDecoding):
        return response_format
    if isinstance(response_format, type) and hasattr(response_format, "model_json_schema"):
        return GuidedDecoding("json_schema", json.dumps(response_format.model_json_schema()))
    if not isinstance(response_format, dict):
        raise TypeError("response_format must be OpenAI's dict ({'type': 'json_object'} or "
                         "{'type': 'json_schema', 'json_schema': {...}}), a pydantic model "
                         "class or a GuidedDecoding")
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return GuidedDecoding("json_object")
    if kind != "json_schema":
        raise ValueError(f"response_format type {kind!r} is not supported by litedeploy; "
                         "use text, json_object or json_schema")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise ValueError(  # noqa: TRY004 - pydantic turns ValueError (not TypeError) into a 400
            "response_format json_schema needs a `json_schema` object with a `name` and a "
            "`schema`")
    schema = spec.get("schema")
    if isinstance(schema, str):
        schema = schema_from_text(schema, "response_format.json_schema.schema")
    if schema is None:
        schema = {}  # OpenAI: no schema means any JSON value
    if not isinstance(schema, dict):
        raise ValueError(  # noqa: TRY004 - pydantic turns ValueError into a 400
            "response_format.json_schema.schema must be a JSON object")
    return GuidedDecoding("json_schema", json.dumps(schema))


def schema_from_text(text: str, name: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name} is not valid JSON: {exc}") from None
