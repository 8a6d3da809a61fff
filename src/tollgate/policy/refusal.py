"""PolicyRefusal: why Tollgate answers a request itself instead of letting it through.

Every refusal becomes an OpenAI-shaped error for the client (status, ``code``, message) and a
ledger row with outcome ``blocked`` and ``block_reason`` = ``code``.

    PolicyRefusal(Exception)
      status 400  invalid_json, invalid_header_value, ambiguous_credentials, invalid_path,
                  provider_not_configured, provider_mismatch
      status 401  invalid_gateway_key
      status 403  user_id_mismatch, provider_not_allowed, base_uri_not_allowed
      status 413  body_too_large
      status 422  user_id_required, invalid_user_id, unknown_limit_id
      status 429  budget_exceeded
      status 500  provider_credentials_missing
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

__all__ = ["PolicyRefusal"]

_FAMILY_NAMES = {
    "anthropic": "Anthropic",
    "azure": "Azure OpenAI",
    "bedrock": "AWS Bedrock",
    "gemini": "Gemini",
    "openai": "OpenAI",
    "vertex": "Vertex AI",
}


class PolicyRefusal(Exception):
    """Raised by policy code when a request must be answered with an error and not forwarded."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        headers: tuple[tuple[str, bytes], ...] = (),
        limit_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers  # extra response headers (retry-after)
        self.limit_id = limit_id  # the limit that refused the request

    @classmethod
    def budget_exceeded(
        cls, limit_id: str, measure: str, reset_at: datetime | None, now: datetime
    ) -> PolicyRefusal:
        headers: tuple[tuple[str, bytes], ...] = ()
        if reset_at is None:
            when = "It does not reset (a total limit)."
        else:
            seconds = max(1, math.ceil((reset_at - now).total_seconds()))
            stamp = reset_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            when, headers = f"It resets at {stamp}.", (("retry-after", str(seconds).encode()),)
        return cls(
            429,
            "budget_exceeded",
            f"The limit {limit_id!r} ({measure}) is spent for this period. {when}",
            headers=headers,
            limit_id=limit_id,
        )

    @classmethod
    def unknown_limit_id(cls, limit_id: str) -> PolicyRefusal:
        return cls(
            422,
            "unknown_limit_id",
            f"The request names a limit that does not exist: {limit_id!r}"
            " (see `tollgate limits list`).",
            param="x-tollgate-limit-ids",
        )

    @classmethod
    def user_id_required(cls) -> PolicyRefusal:
        return cls(
            422,
            "user_id_required",
            "This gateway requires an end-user id. Send it in the x-tollgate-user-id header "
            "(or the body's `user` field).",
            param="user",
        )

    @classmethod
    def invalid_user_id(cls) -> PolicyRefusal:
        return cls(
            422,
            "invalid_user_id",
            "The end-user id may only contain letters, digits and . _ : @ - "
            "(at most 255 characters).",
            param="user",
        )

    @classmethod
    def invalid_gateway_key(cls) -> PolicyRefusal:
        return cls(401, "invalid_gateway_key", "The gateway key is unknown, revoked or malformed.")

    @classmethod
    def user_id_mismatch(cls) -> PolicyRefusal:
        return cls(
            403,
            "user_id_mismatch",
            "The request names an end user other than the one its credentials belong to.",
            param="user",
        )

    @classmethod
    def provider_not_allowed(cls, provider: str) -> PolicyRefusal:
        return cls(
            403,
            "provider_not_allowed",
            f"This gateway key may not be used with provider {provider!r}.",
        )

    @classmethod
    def invalid_header_value(cls, header: str, expected: str) -> PolicyRefusal:
        return cls(
            400,
            "invalid_header_value",
            f"Header {header} must be {expected}.",
            param=header,
        )

    @classmethod
    def ambiguous_credentials(cls, header: str) -> PolicyRefusal:
        """A credential header sent twice with different values, or several credentials in
        one ``authorization`` value."""
        return cls(
            400,
            "ambiguous_credentials",
            f"The request carries more than one credential in {header}; send exactly one.",
            param=header,
        )

    @classmethod
    def misplaced_gateway_key(cls, header: str) -> PolicyRefusal:
        """A gateway key anywhere it would travel upstream (same code as the above: the
        request's credentials cannot be told apart safely)."""
        return cls(
            400,
            "ambiguous_credentials",
            f"A gateway key (tg_...) was found in {header}; send it only as "
            "'authorization: Bearer tg_...' or in x-tollgate-key.",
            param=header,
        )

    @classmethod
    def invalid_json(cls, why: str) -> PolicyRefusal:
        return cls(400, "invalid_json", f"The request body could not be read as JSON: {why}.")

    @classmethod
    def body_too_large(cls, limit: int) -> PolicyRefusal:
        return cls(
            413, "body_too_large", f"The decompressed request body is larger than {limit} bytes."
        )

    @classmethod
    def base_uri_not_allowed(cls) -> PolicyRefusal:
        return cls(
            403,
            "base_uri_not_allowed",
            "The requested base URI is not on this gateway's allow-list.",
            param="x-tollgate-base-uri",
        )

    @classmethod
    def provider_not_configured(cls, family: str) -> PolicyRefusal:
        """A path of an API family no configured provider speaks (never sent elsewhere)."""
        return cls(
            400,
            "provider_not_configured",
            f"This is a {_FAMILY_NAMES.get(family, family)} API path, and this gateway has no "
            f"provider for it; ask its operator to configure one (api = {family!r}).",
        )

    @classmethod
    def provider_mismatch(cls, family: str, provider: str) -> PolicyRefusal:
        """A path of one API family sent, by base URI or model prefix, to another's provider."""
        return cls(
            400,
            "provider_mismatch",
            f"This is a {_FAMILY_NAMES.get(family, family)} API path; provider {provider!r} "
            "does not speak it.",
        )

    @classmethod
    def provider_credentials_missing(cls, provider: str) -> PolicyRefusal:
        return cls(
            500,
            "provider_credentials_missing",
            f"The gateway holds no API key for provider {provider!r}; ask its operator to "
            "configure one.",
        )
