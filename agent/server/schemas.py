"""The request body of /v1/chat/completions. Unknown fields are ignored, as OpenAI's servers do; fields
Engram cannot honour are accepted here and refused by `refusals` with a clear 400, never silently dropped."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[dict[str, Any]]
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(None, ge=1)
    user: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # accepted only to be refused (see refusals)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def wanted_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def refusals(self) -> list[tuple[str, str]]:
        """(param, reason) for each field set that Engram cannot honour."""
        out = []
        for name in ("tools", "functions"):
            if getattr(self, name):
                out.append((name, f"`{name}` is not supported: Engram's models have no tool calling"))
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                out.append((name, f"`{name}` is not supported: Engram's models have no tool calling"))
        if self.logprobs or self.top_logprobs:
            out.append(("logprobs", "`logprobs` is not supported"))
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            out.append(("response_format", f"response_format {self.response_format.get('type')!r} is not "
                                           "supported; only 'text'"))
        if len(self.stops()) > 4:
            out.append(("stop", "at most 4 stop sequences"))
        return out
