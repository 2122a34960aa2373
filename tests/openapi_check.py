"""Check real responses against the OpenAPI document serving publishes."""

from __future__ import annotations

from typing import Any

import jsonschema

from serving.app import openapi_document


def response_schema(path: str, method: str, status: int) -> dict[str, Any]:
    """The JSON schema of one documented response, with the components it refers to."""
    spec = openapi_document()
    response = spec["paths"][path][method.lower()]["responses"][str(status)]
    if "$ref" in response:
        response = spec["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    schema = response["content"]["application/json"]["schema"]
    # "#/components/..." references resolve against the root: carry the components along.
    return {**schema, "components": spec["components"]}


def check(path: str, method: str, status: int, body: Any) -> None:
    """Raise ``jsonschema.ValidationError`` when ``body`` breaks the documented schema."""
    jsonschema.Draft202012Validator(response_schema(path, method, status)).validate(body)
