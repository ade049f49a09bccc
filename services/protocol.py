"""OpenAI chat-completions wire format: request validation, error objects, responses and stream chunks.

Pure (no Ray, no model): the replica's chat completions (services/serving.py) turn requests into prompts and
sampling settings with these, and every error a client sees has OpenAI's shape
{"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from crlft.data.records import Message
from crlft.inference.sampling import Completion, SamplingParams

MAX_CHOICES = 8
MAX_STOP_STRINGS = 4
MAX_SEED = 2**63 - 1 - MAX_CHOICES
# OpenAI's limits on a request's `metadata`: pairs, key length, value length.
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MAX_FEEDBACK_BYTES = 64 * 1024  # a feedback body beyond this is refused (413)
MAX_CORRECTION_CHARS = 32_000
MAX_COMMENT_CHARS = 4_000
SYSTEM_ROLES = ("system", "developer")  # "developer" is OpenAI's newer name for the system message


class ApiError(Exception):
    """An error answered to the client in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ... are accepted and ignored
    role: str
    content: str | list[TextPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The fields this server honours; any other OpenAI field is accepted and ignored, except those that would
    change the answer's meaning and are not supported (refused with 400 by `check_unsupported`)."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)  # choice i samples with seed + i: a 64-bit generator seed
    stop: str | list[str] | None = None
    condition: str | None = None  # crlft: the class written into the prompt (default: the inference condition)
    store: bool | None = Field(None, strict=True)  # keep the answer for training (None: the server's default)
    metadata: dict[str, str] | None = None  # stored with the answer (OpenAI's limits)

    @field_validator("metadata", mode="before")
    @classmethod
    def _metadata(cls, value: Any) -> Any:
        if value is None:
            return value
        if not isinstance(value, dict):
            raise ValueError("expected an object of string keys and string values")
        if len(value) > MAX_METADATA_PAIRS:
            raise ValueError(f"at most {MAX_METADATA_PAIRS} pairs, got {len(value)}")
        for key, text in value.items():
            if len(key) > MAX_METADATA_KEY:
                raise ValueError(f"keys are at most {MAX_METADATA_KEY} characters: {key[:MAX_METADATA_KEY]!r}...")
            if not isinstance(text, str):
                raise ValueError(f"values must be strings: {key!r} is {type(text).__name__}")
            if len(text) > MAX_METADATA_VALUE:
                raise ValueError(f"values are at most {MAX_METADATA_VALUE} characters: {key!r} has {len(text)}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return value

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def check_unsupported(self) -> None:
        extra = self.model_extra or {}
        for name in ("tools", "functions", "tool_choice", "function_call"):
            if extra.get(name):
                raise ApiError(400, f"{name} is not supported by this model", param=name, code="unsupported_parameter")
        if extra.get("logprobs") or extra.get("top_logprobs"):
            raise ApiError(400, "logprobs are not supported", param="logprobs", code="unsupported_parameter")
        response_format = extra.get("response_format")
        if isinstance(response_format, dict) and response_format.get("type", "text") != "text":
            raise ApiError(400, "only response_format {\"type\": \"text\"} is supported", param="response_format",
                           code="unsupported_parameter")

    def sampling(self, default_max_tokens: int) -> list[SamplingParams]:
        """One SamplingParams per choice; with a seed, choice i uses seed + i (reproducible, yet distinct)."""
        max_tokens = self.max_completion_tokens or self.max_tokens or default_max_tokens
        return [
            SamplingParams(
                max_tokens=max_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                seed=None if self.seed is None else self.seed + i,
                stop=self.stop_strings,
            )
            for i in range(self.n)
        ]


def parse_request(raw: bytes) -> ChatCompletionRequest:
    request = _validated(ChatCompletionRequest, raw)
    request.check_unsupported()
    return request


Body = TypeVar("Body", bound=BaseModel)


def _validated(model: type[Body], raw: bytes) -> Body:
    """The body as `model`, or an OpenAI-shaped 400 naming the first field that is wrong."""
    try:
        return model.model_validate(_json_object(raw))
    except ValidationError as exc:
        first = exc.errors()[0]
        param = _param_path(first["loc"])
        raise ApiError(400, f"{param or 'body'}: {first['msg']}", param=param or None) from None


class FeedbackRequest(BaseModel):
    """POST /v1/feedback: a rating, a better answer or a comment on one choice of a stored completion."""

    model_config = ConfigDict(extra="forbid", strict=True)
    id: str
    choice: int = Field(0, ge=0, lt=MAX_CHOICES)
    rating: int | None = None
    correction: str | None = Field(None, max_length=MAX_CORRECTION_CHARS)
    comment: str | None = Field(None, max_length=MAX_COMMENT_CHARS)

    @field_validator("rating", mode="before")
    @classmethod
    def _rating(cls, value: Any) -> Any:
        if value is not None and (type(value) is not int or value not in (1, -1)):
            raise ValueError("rating is 1 (good) or -1 (bad)")
        return value

    @field_validator("correction", "comment")
    @classmethod
    def _some_text(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value


def parse_feedback(raw: bytes) -> FeedbackRequest:
    """A feedback body, or an OpenAI-shaped 400 naming the field."""
    feedback = _validated(FeedbackRequest, raw)
    if feedback.rating is None and feedback.correction is None and feedback.comment is None:
        raise ApiError(400, "give a rating (1 or -1), a correction or a comment", param="rating")
    return feedback


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return data


def _param_path(loc: Sequence[int | str]) -> str:
    # Pydantic adds union-branch names (e.g. "str", "list[TextPart]") to locations; they mean nothing to a client.
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[TextPart]", "list[str]", "int", "float", "bool") or part.startswith("function-"):
            continue
        else:
            out += f".{part}" if out else part
    return out


def to_conversation(messages: Sequence[ChatMessage]) -> tuple[str, list[Message]]:
    """(system prompt, turns) for the template: system/developer messages only at the start, then user and
    assistant turns, ending with the user's."""
    system_parts: list[str] = []
    turns: list[Message] = []
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        text = _text(m, param)
        if m.role in SYSTEM_ROLES:
            if turns:
                raise ApiError(400, f"{param}: a {m.role} message is allowed only before the first user message",
                               param=f"{param}.role")
            system_parts.append(text)
        elif m.role in ("user", "assistant"):
            turns.append(Message(m.role, text))  # type: ignore[arg-type]
        else:
            raise ApiError(
                400, f"{param}.role: {m.role!r} is not supported; use system, developer, user or assistant",
                param=f"{param}.role",
            )
    if not turns or turns[-1].role != "user":
        raise ApiError(400, "messages: the conversation must end with a user message", param="messages")
    return "\n".join(system_parts), turns


def _text(m: ChatMessage, param: str) -> str:
    if m.content is None:
        raise ApiError(400, f"{param}.content: content is required", param=f"{param}.content")
    if isinstance(m.content, str):
        return m.content
    texts = []
    for j, part in enumerate(m.content):
        if part.type != "text" or part.text is None:
            raise ApiError(400, f"{param}.content[{j}]: only text parts are supported, got {part.type!r}",
                           param=f"{param}.content")
        texts.append(part.text)
    return "".join(texts)


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completions: Sequence[Completion]) -> dict[str, int]:
    """The prompt is counted once (it is one prompt, whatever n); every sampled token of every choice is counted."""
    completion_tokens = sum(c.completion_tokens for c in completions)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def finish_reason(c: Completion) -> Literal["stop", "length"]:
    return "length" if c.finish_reason == "length" else "stop"


def chat_completion(cid: str, model: str, fingerprint: str, prompt_tokens: int,
                    completions: Sequence[Completion]) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": None,
                "finish_reason": finish_reason(c),
            }
            for i, c in enumerate(completions)
        ],
        "usage": usage(prompt_tokens, completions),
    }


def chunk(cid: str, created: int, model: str, fingerprint: str, choices: list[dict[str, Any]],
          usage_: dict[str, int] | None = None) -> str:
    """One server-sent event of a streamed completion."""
    body: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": choices,
    }
    if usage_ is not None:
        body["usage"] = usage_
    return sse(body)


def delta_choice(index: int, delta: dict[str, str], reason: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}


def sse(body: dict[str, Any] | str) -> str:
    data = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
    return f"data: {data}\n\n"


def model_card(name: str, created: int, extra: dict[str, Any]) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "crlft", **extra}
