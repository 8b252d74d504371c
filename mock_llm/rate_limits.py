"""A request too large for the organization's tokens-per-minute limit on its own,
refused in each vendor's words (``[[mock tpm=N]]``, `MockBehaviour.tpm_limit`).

Vendors answer it with a 429 that looks much like a load 429, so a gateway spreading
streams over a pool of keys sees "rate limited" on every key it tries:

* OpenAI: 429, ``type: "tokens"``, ``code: "rate_limit_exceeded"``, a message
  starting ``Request too large for <model> in organization <org> on tokens per min
  (TPM): Limit N, Requested M.`` (a load 429 says ``Rate limit reached for … Used U,
  Requested M``), and the ``x-ratelimit-*`` headers every answer carries
  (https://platform.openai.com/docs/guides/rate-limits).
* Anthropic: 429 ``rate_limit_error`` "This request would exceed the rate limit for
  your organization … of N input tokens per minute", with ``retry-after`` and the
  ``anthropic-ratelimit-input-tokens-*`` headers (https://docs.anthropic.com/en/api/rate-limits).
* Google: 429 ``RESOURCE_EXHAUSTED`` "You exceeded your current quota", with a
  ``google.rpc.QuotaFailure`` naming the per-minute input-token quota and a
  ``RetryInfo`` delay, the very shape of a load 429
  (https://ai.google.dev/gemini-api/docs/rate-limits).

The mock counts what is requested as OpenAI does: prompt tokens plus ``max_tokens``.
"""

from __future__ import annotations

from typing import Any

from mock_llm.errors import MockAPIError

ORGANIZATION = "org-mock"
ANTHROPIC_ORGANIZATION = "00000000-0000-4000-8000-000000000000"
# What a fresh minute holds for requests: the limit is untouched by anything else.
REQUESTS_PER_MINUTE = 500
RETRY_SECONDS = 7


class RequestTooLarge(MockAPIError):
    """`requested` tokens asked of a model whose per-minute limit is `limit`."""

    def __init__(self, model: str, limit: int, requested: int) -> None:
        super().__init__(
            429,
            f"Request too large for {model} in organization {ORGANIZATION} on tokens per "
            f"min (TPM): Limit {limit}, Requested {requested}. The input or output tokens "
            "must be reduced in order to run successfully. Visit "
            "https://platform.openai.com/account/rate-limits to learn more.",
            code="rate_limit_exceeded",
            type="tokens",
        )
        self.model = model
        self.limit = limit
        self.requested = requested

    def body_for(self, vendor: str) -> dict[str, Any]:
        if vendor == "anthropic":
            return {
                "type": "error",
                "error": {
                    "type": "rate_limit_error",
                    "message": (
                        "This request would exceed the rate limit for your organization "
                        f"({ANTHROPIC_ORGANIZATION}) of {self.limit:,} input tokens per "
                        "minute. For details, refer to: https://docs.anthropic.com/en/api/"
                        "rate-limits. You can see the response headers for current usage. "
                        "Please reduce the prompt length or the maximum tokens requested, "
                        "or try again later."
                    ),
                },
            }
        if vendor == "google":
            return {"error": self._google_error()}
        return self.body()

    def _google_error(self) -> dict[str, Any]:
        return {
            "code": 429,
            "message": (
                "You exceeded your current quota, please check your plan and billing "
                "details. For more information on this error, head to: "
                "https://ai.google.dev/gemini-api/docs/rate-limits."
            ),
            "status": "RESOURCE_EXHAUSTED",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                    "violations": [
                        {
                            "quotaMetric": "generativelanguage.googleapis.com/"
                            "generate_content_paid_tier_input_token_count",
                            "quotaId": "GenerateContentPaidTierInputTokensPerModelPerMinute",
                            "quotaDimensions": {"location": "global", "model": self.model},
                            "quotaValue": str(self.limit),
                        }
                    ],
                },
                {
                    "@type": "type.googleapis.com/google.rpc.Help",
                    "links": [
                        {
                            "description": "Learn more about Gemini API quotas",
                            "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
                        }
                    ],
                },
                {
                    "@type": "type.googleapis.com/google.rpc.RetryInfo",
                    "retryDelay": f"{RETRY_SECONDS}s",
                },
            ],
        }

    def headers_for(self, vendor: str) -> dict[str, str]:
        if vendor == "anthropic":
            return {
                "retry-after": str(RETRY_SECONDS),
                "anthropic-ratelimit-input-tokens-limit": str(self.limit),
                "anthropic-ratelimit-input-tokens-remaining": str(self.limit),
            }
        if vendor == "google":
            return {}  # Google says when in the body's RetryInfo, not in a header
        return {
            "x-ratelimit-limit-requests": str(REQUESTS_PER_MINUTE),
            "x-ratelimit-limit-tokens": str(self.limit),
            "x-ratelimit-remaining-requests": str(REQUESTS_PER_MINUTE),
            "x-ratelimit-remaining-tokens": str(self.limit),
            "x-ratelimit-reset-requests": "0s",
            "x-ratelimit-reset-tokens": "0s",
        }
