"""`POST /v1/completions` on the wire: the request and the text-completion response."""

from __future__ import annotations

from pydantic import Field, field_validator

from wicore_cpp.engine.client import SamplingParams
from wicore_cpp.http.protocol import Refusal, SamplingFields, parse_body, usage

COMPLETION_REFUSED: dict[str, Refusal] = {
    "suffix": (None, ": insertion (fill in the middle) is not available"),
}


class CompletionRequest(SamplingFields):
    """`POST /v1/completions`: a raw prompt (text or token ids), no chat template."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: the prompt alone
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = Field(None, ge=1)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        # A list of one prompt is what batching clients (LangChain) send for one prompt.
        if isinstance(value, list) and value and isinstance(value[0], (str, list)):
            if len(value) != 1:
                raise ValueError("one prompt per request (send a request per prompt)")
            value = value[0]
        if isinstance(value, list) and not value:
            raise ValueError("the prompt is empty")
        return value

    def check(self) -> None:
        from wicore_cpp.errors import UnsupportedParameter

        if self.best_of is not None and self.best_of != self.n:
            raise UnsupportedParameter("best_of other than n is not supported", param="best_of")
        if self.echo and self.logprobs is not None:
            raise UnsupportedParameter("log-probabilities of the echoed prompt are not "
                                       "available: send echo or logprobs, not both",
                                       param="echo")
        if self.max_tokens == 0 and not self.echo:
            raise UnsupportedParameter("max_tokens 0 is only meaningful with echo",
                                       param="max_tokens")

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        max_tokens = default_max_tokens if self.max_tokens is None else self.max_tokens
        return self.sampling_params(max_tokens, self.logprobs)


def parse_completion_request(body: bytes) -> CompletionRequest:
    request = parse_body(body, CompletionRequest, COMPLETION_REFUSED)
    request.check()
    return request


def text_completion(request_id: str, created: int, model: str, choices: list[dict],
                    prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
    }
