"""The request's reference page (docs/request-reference.md), generated from the pydantic models that validate it
(schema.py): every field of every section, its type, default and description, in the order a reader meets them.
`gemma-job reference > docs/request-reference.md` writes it; tests/test_docs.py fails when the committed page
differs from what the models generate."""

from __future__ import annotations

import json
from typing import Any

HEADER = """# The request: every field

Generated from the pydantic models in `schema.py` by `gemma-job reference > docs/request-reference.md`; do
not edit by hand (`tests/test_docs.py` fails when this page and the models differ). What the fields do
together, the request's forms and examples: [request.md](request.md).
"""


def type_of(prop: dict[str, Any]) -> str:
    """A property's JSON Schema type in a few words: enums listed, references linked, nullable marked."""
    if "$ref" in prop:
        name = prop["$ref"].rsplit("/", 1)[1]
        return f"[{name}](#{name.lower()})"
    if "enum" in prop:
        return " | ".join(f"`{json.dumps(v)}`" for v in prop["enum"])
    if "const" in prop:
        return f"`{json.dumps(prop['const'])}`"
    if "anyOf" in prop:
        kinds = [type_of(p) for p in prop["anyOf"]]
        return " or ".join(dict.fromkeys(kinds))
    kind = prop.get("type", "any")
    if prop.get("format") == "password":  # a SecretStr: masked in logs, removed from the request object after
        kind = "secret string"
    if kind == "array":
        return f"list of {type_of(prop.get('items', {}))}"
    if kind == "object" and "additionalProperties" in prop and isinstance(prop["additionalProperties"], dict):
        return f"map of {type_of(prop['additionalProperties'])}"
    limits = [f"{sym} {prop[key]}" for key, sym in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"),
                                                    ("exclusiveMaximum", "<"), ("minLength", "length ≥"),
                                                    ("maxLength", "length ≤")) if key in prop]
    return kind + (f" ({', '.join(limits)})" if limits else "")


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def section(name: str, schema: dict[str, Any]) -> list[str]:
    lines = [f"## {name}", ""]
    if schema.get("description"):
        lines += [cell(schema["description"]), ""]
    required = set(schema.get("required", ()))
    lines += ["| field | type | default | description |", "|---|---|---|---|"]
    for field, prop in schema.get("properties", {}).items():
        default = "required" if field in required else f"`{json.dumps(prop['default'])}`" if "default" in prop else ""
        lines.append(f"| `{field}` | {cell(type_of(prop))} | {cell(default)} | {cell(prop.get('description', ''))} |")
    return lines + [""]


def render() -> str:
    """The page: the request's own fields, then each section it refers to, in the order a reader meets them."""
    from schema import TrainRequest

    schema = TrainRequest.model_json_schema()
    defs, order = schema.get("$defs", {}), []

    def visit(sub: dict[str, Any]) -> None:
        for prop in sub.get("properties", {}).values():
            for ref in refs(prop):
                if ref not in order:
                    order.append(ref)
                    visit(defs[ref])

    visit(schema)
    lines = [HEADER, *section("TrainRequest", schema)]
    for name in order + sorted(set(defs) - set(order)):
        lines += section(name, defs[name])
    return "\n".join(lines).rstrip() + "\n"


def refs(prop: Any) -> list[str]:
    """The sections a property refers to, wherever in it ($ref, items, anyOf)."""
    if isinstance(prop, dict):
        own = [prop["$ref"].rsplit("/", 1)[1]] if "$ref" in prop else []
        return own + [r for value in prop.values() for r in refs(value)]
    if isinstance(prop, list):
        return [r for value in prop for r in refs(value)]
    return []


def undocumented() -> list[str]:
    """Fields with no description, as `Model.field`."""
    from schema import TrainRequest

    schema = TrainRequest.model_json_schema()
    return [f"{name}.{field}" for name, sub in [("TrainRequest", schema), *schema.get("$defs", {}).items()]
            for field, prop in sub.get("properties", {}).items() if not prop.get("description")]
