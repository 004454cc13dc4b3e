"""`POST /v1/completions` on the wire: the request and the text-completion response."""

from __future__ import annotations

import dataclasses

from pydantic import Field, field_validator

from wicore_cpp.engine.client import SamplingParams
from wicore_cpp.errors import InvalidRequest, UnsupportedParameter
from wicore_cpp.http.protocol import Refusal, SamplingFields, parse_body, usage

COMPLETION_REFUSED: dict[str, Refusal] = {
    "suffix": (None, ": insertion (fill in the middle) is not available"),
}


class CompletionRequest(SamplingFields):
    """`POST /v1/completions`: a raw prompt (text or token ids) or a list of them, no chat
    template. Choices are numbered prompt-major: prompt p's choice i is `p * n + i`."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: the prompt alone
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = Field(None, ge=1)

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("the prompt is empty")
        if isinstance(value, list) and isinstance(value[0], list) and not all(value):
            raise ValueError("a prompt in the list is empty")
        return value

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request: one (text or token ids) or a list of them."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)

    def check(self, max_prompts: int) -> None:
        if len(self.prompts) > max_prompts:
            raise InvalidRequest(f"at most {max_prompts} prompts in one request on this server "
                                 f"(max_concurrent_requests)", param="prompt")
        if self.best_of is not None and self.best_of != self.n:
            raise UnsupportedParameter("best_of other than n is not supported", param="best_of")
        if self.max_tokens == 0 and not self.echo:
            raise UnsupportedParameter("max_tokens 0 is only meaningful with echo",
                                       param="max_tokens")

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Echo with logprobs: the echoed prompt's tokens come with theirs too."""
        return self.echo and self.logprobs is not None

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        max_tokens = default_max_tokens if self.max_tokens is None else self.max_tokens
        params = self.sampling_params(max_tokens, self.logprobs)
        if self.wants_prompt_logprobs:
            # Every prompt position is computed: none may come from the prompt cache.
            params = dataclasses.replace(params, prompt_logprobs=True, cache_prompt=False)
        return params


def parse_completion_request(body: bytes, max_prompts: int) -> CompletionRequest:
    """The request, checked; a list of more than `max_prompts` prompts is refused."""
    request = parse_body(body, CompletionRequest, COMPLETION_REFUSED)
    request.check(max_prompts)
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
