"""Reading the request: JSON text to a validated `TrainRequest` (schema.py), with errors a user can
act on (the field path, the value given, what is allowed, the nearest known key), and the raw request
without its secrets, which is what stays in the config bucket once the job is over. (The job's
environment is read into `Settings` by runtime/settings.py.)
"""

from __future__ import annotations

import difflib
import json
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from runtime.errors import RequestError
from schema import Hyperparameters, TrainRequest


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """Names valid at the model that holds loc[-1] (walks TrainRequest's annotations)."""
    model: Any = TrainRequest
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        model = field.annotation
        while get_origin(model) in (Union, list) or str(get_origin(model)) == "types.UnionType":
            model = next(a for a in get_args(model) if a is not type(None))
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
    names = set(model.model_fields)
    if model is Hyperparameters:
        names.add("max_seq_length")
    return sorted(names)


def explain(err: ValidationError) -> str:
    """One line per problem: path, the value given, what is allowed; unknown keys get a suggestion."""
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        path = ".".join(str(p) for p in loc) or "request"
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), _fields_at(loc), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; allowed here: {', '.join(_fields_at(loc))}"
            lines.append(f"{path}: unknown key '{loc[-1]}'{hint}")
        elif e["type"] == "missing":
            lines.append(f"{path}: required field is missing; add it to the request.")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            value = e.get("input")
            shown = "" if isinstance(value, dict) else f" (got {json.dumps(value, default=str)[:80]})"
            lines.append(f"{path}: {msg}{shown}")
    return "invalid request: " + "; ".join(lines)


def parse_request(text: str | bytes) -> TrainRequest:
    """Validate the request JSON, raising RequestError with a message the user can act on."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(f"the request is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}; "
                           "fix the JSON syntax.") from None
    if not isinstance(raw, dict):
        raise RequestError(f"the request must be a JSON object, got {type(raw).__name__}.")
    try:
        return TrainRequest.model_validate(raw)
    except ValidationError as e:
        raise RequestError(explain(e)) from None


SECRET_KEYS = frozenset({"hf_token", "api_key", "gemini_api_key", "secret"})  # "secret": notify's


def strip_secrets(raw: Any) -> tuple[Any, int]:
    """The raw request JSON without its secret keys (at any depth), and how many were removed: what
    stays in the config bucket once the job is over."""
    if isinstance(raw, dict):
        out, n = {}, 0
        for key, value in raw.items():
            if key in SECRET_KEYS:
                n += 1
                continue
            out[key], k = strip_secrets(value)
            n += k
        return out, n
    if isinstance(raw, list):
        pairs = [strip_secrets(v) for v in raw]
        return [v for v, _ in pairs], sum(k for _, k in pairs)
    return raw, 0
