"""The OpenAI request and response shapes the server takes and answers (pydantic; they make /openapi.json).

Requests are strict: `max_tokens: "16"` or `stream: 0` are refused with a 400, not coerced; every number is
bounded; a field this server does not implement but that would change the output (`logit_bias`, `suffix`,
`tools`, a non-text `response_format`, `best_of` > 1, `n` > 1) is refused with a 400 naming it, never
silently ignored. Other unknown fields (`user`, `metadata`, ...) are ignored. As in OpenAI's spec, every optional
field may be `null`: it means unset (the default), never an error.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel as Schema
from pydantic import ConfigDict, Field, field_validator, model_validator

from .scheduler import MAX_STOP_CHARS, MAX_STOPS, MAX_TOP_LOGPROBS, SEED_RANGE

MAX_PROMPTS = 64  # prompts in one completions request
MAX_TOKENS = 2**31 - 1  # the prompt and max_tokens must also fit the model's context (checked per request)

# fields of OpenAI's API this server does not implement: a value other than these is refused
_UNSUPPORTED = {"logit_bias": (None, {}), "suffix": (None, ""), "tools": (None, []), "functions": (None, []),
                "best_of": (None, 1), "response_format": (None, {"type": "text"})}

NonEmpty = Annotated[str, Field(min_length=1)]
Text = Annotated[str, Field(min_length=0)]  # a constrained str: pydantic checks it is valid Unicode (no lone surrogate)
Stop = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=MAX_TOKENS)]], Field(min_length=1)]  # a prompt as token ids


def _num(lo: float, hi: float, *, gt: bool = False):
    return Annotated[float, Field(**({"gt": lo} if gt else {"ge": lo}), le=hi, allow_inf_nan=False)]


class _Strict(Schema):
    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        """`null` for an optional field is that field unset (OpenAI's spec marks them nullable)."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items()
                    if not (v is None and k in cls.model_fields and not cls.model_fields[k].is_required())}
        return data


class StreamOptions(_Strict):
    include_usage: bool | None = Field(False, description="a last chunk with the request's usage (and `usage: null` "
                                                          "before)")


class _Common(_Strict):
    model: str = Field(min_length=1, max_length=4096, examples=["base"],
                       description="base, an adapter, a saved or routed composition, a full-model artifact, or "
                                   "mix:a=0.5,b=0.5 (weights finite, |w| <= 100); see GET /v1/models")
    temperature: _num(0, 2) | None = Field(0.0, description="0 (default, or below 1e-5): greedy; else sampling at "
                                                            "this temperature")
    top_p: _num(0, 1, gt=True) | None = Field(1.0, description="nucleus sampling mass")
    presence_penalty: _num(-2, 2) | None = Field(0.0, description="subtracted from the logit of every token already "
                                                                  "generated")
    frequency_penalty: _num(-2, 2) | None = Field(0.0, description="times a token's count so far, subtracted from its "
                                                                   "logit")
    seed: Annotated[int, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])] | None = Field(
        None, description="this request's own sampling seed (same seed, same text, whatever the batch)")
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOPS)] | None = Field(
        None, description=f"up to {MAX_STOPS} strings: the text ends before the first one (never sent)")
    stream: bool | None = Field(False, description="server-sent events, one chunk per piece of text")
    stream_options: StreamOptions | None = Field(None, description="with stream: include_usage")
    n: Annotated[int, Field(ge=1, le=1)] | None = Field(1, description="choices per prompt: 1 only (n > 1 is "
                                                                       "refused)")
    ignore_eos: bool | None = Field(False, description="vLLM's extension: keep decoding past the end-of-sequence "
                                                      "token up to max_tokens (benchmarks)")

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, allowed in _UNSUPPORTED.items():
                if key in data and data[key] not in allowed:
                    raise ValueError(f"{key}: not supported by this server")
        return data

    @field_validator("n", mode="before")
    @classmethod
    def _one_choice(cls, n: Any) -> Any:
        if isinstance(n, int) and not isinstance(n, bool) and n > 1:
            raise ValueError(f"n = {n} is not supported: one choice per prompt; send {n} requests instead")
        return n

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    prompt: (NonEmpty | Annotated[list[NonEmpty], Field(min_length=1, max_length=MAX_PROMPTS)] | TokenIds
             | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]) = Field(
        description=f"a non-empty prompt, or a list of 1 to {MAX_PROMPTS} (one choice each); a prompt may also be "
                    "given as token ids (a list of integers, or a list of such lists)")
    max_tokens: Annotated[int, Field(ge=0, le=MAX_TOKENS)] | None = Field(
        None, description="tokens to generate: default 16, or the room left in the context if less; with the prompt "
                          "they must fit the model's context; 0 with echo scores the prompt only")
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = Field(
        None, description="logprob of each token and of this many alternatives (and of the chosen token when it is "
                          "not among them)")
    echo: bool | None = Field(False, description="the prompt before the completion (and its tokens' logprobs)")

    @property
    def prompts(self) -> list[str | list[int]]:
        """One entry per choice: a string, or token ids."""
        p = self.prompt
        return [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1, max_length=4096)
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)] | None = Field(
        None, description="deprecated name of max_completion_tokens")
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)] | None = Field(
        None, description="tokens to generate (default: the room left in the model's context after the prompt); with "
                          "the prompt they must fit the model's context")
    logprobs: bool | None = Field(False, description="logprob of each generated token")
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = Field(
        None, description="with logprobs: this many alternatives per token")

    @model_validator(mode="after")
    def _consistent(self) -> ChatRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError(f"max_tokens ({self.max_tokens}) and max_completion_tokens "
                             f"({self.max_completion_tokens}) differ: send one")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs = true")
        return self

    @property
    def limit(self) -> int | None:
        """The tokens asked for; None: unset (the room left in the context)."""
        return self.max_completion_tokens or self.max_tokens


# -- responses (documented in /openapi.json; the handlers build plain dicts of these shapes)
class ErrorBody(Schema):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(Schema):
    error: ErrorBody


class Usage(Schema):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(Schema):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(Schema):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: CompletionLogprobs | None


class Completion(Schema):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(Schema):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(Schema):
    content: list[ChatTokenLogprob] | None


class AssistantMessage(Schema):
    role: Literal["assistant"]
    content: str


class ChatChoice(Schema):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChoiceLogprobs | None


class ChatCompletion(Schema):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChunkChoice(Schema):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: CompletionLogprobs | None


class CompletionChunk(Schema):
    """One server-sent event of a completions stream (the last one, with include_usage: no choices, the usage)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class Delta(Schema):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(Schema):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionChunk(Schema):
    """One server-sent event of a chat stream: the first delta has the role, the last a finish_reason."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


STREAM_CHUNKS = (CompletionChunk, ChatCompletionChunk)  # documented in /openapi.json as the events' data


def sse_schema(chunk: type[Schema]) -> dict:
    """OpenAPI 3.1 schema of one server-sent event: `data` is a JSON chunk (or an error), or the final [DONE]."""
    data = {"anyOf": [{"const": "[DONE]"},
                      {"type": "string", "contentMediaType": "application/json",
                       "contentSchema": {"anyOf": [{"$ref": f"#/components/schemas/{chunk.__name__}"},
                                                   {"$ref": "#/components/schemas/ErrorResponse"}]}}]}
    return {"type": "object", "required": ["data"], "properties": {"data": data, "event": {"type": "string"}}}


class LoadLoraAdapterRequest(_Strict):
    """POST /v1/load_lora_adapter (vLLM's): serve the adapter in `lora_path` under `lora_name`."""

    lora_name: str = Field(min_length=1, max_length=200, description="the model name requests will use (an expert "
                                                                      "name: letters, digits, _ . - ; not taken)")
    lora_path: str = Field(min_length=1, max_length=4096, description="a PEFT LoRA adapter folder on the server "
                                                                       "(safetensors), or a saved composition's "
                                                                       "artifact folder, over the server's base: an "
                                                                       "absolute path, or one relative to the "
                                                                       "server's working directory (`~` is not "
                                                                       "expanded)")


class UnloadLoraAdapterRequest(_Strict):
    """POST /v1/unload_lora_adapter (vLLM's): stop serving adapter or saved composition `lora_name`."""

    lora_name: str = Field(min_length=1, max_length=200, description="a served adapter's or saved composition's name "
                                                                      "(not `base`)")


class ModelCard(Schema):
    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    kind: str


class ModelList(Schema):
    object: Literal["list"]
    data: list[ModelCard]


__all__ = ["ChatCompletion", "ChatCompletionChunk", "ChatRequest", "Completion", "CompletionChunk",
           "CompletionRequest", "ErrorResponse", "LoadLoraAdapterRequest", "Message", "ModelCard", "ModelList", "UnloadLoraAdapterRequest",
           "sse_schema"]
