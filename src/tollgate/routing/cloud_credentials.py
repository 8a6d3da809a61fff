"""Cloud credentials Tollgate holds for gateway keys: Google access tokens and AWS signatures.

Vertex AI and Bedrock take no static API key. For a gateway key that injects credentials,
Tollgate

* sends Vertex AI an OAuth access token minted from a configured service account
  (:class:`GoogleAccessTokens`, google-auth), refreshed in a background thread well before it
  expires, so the request path only reads the current token;
* signs each Bedrock request with AWS Signature Version 4 (:class:`AwsSigner`, botocore's
  signer and credential chain: environment, profile, web identity, instance role), after the
  body is known, since the signature covers the body's hash.

Neither object's repr shows a secret; neither logs one. Both libraries are imported only
when such a provider is configured.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tollgate.config import ConfigError

__all__ = ["AwsSigner", "GoogleAccessTokens"]

log = logging.getLogger(__name__)

_CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
# Refresh this long before a token expires (Google's tokens live an hour).
_REFRESH_MARGIN_S = 600
_RETRY_S = 10.0


def _google_transport() -> Any:
    """google-auth's transport interface over urllib (no `requests` needed)."""
    from google.auth import exceptions, transport

    class Response(transport.Response):
        def __init__(self, status: int, headers: Mapping[str, str], data: bytes) -> None:
            self._status, self._headers, self._data = status, dict(headers), data

        @property
        def status(self) -> int:
            return self._status

        @property
        def headers(self) -> Mapping[str, str]:
            return self._headers

        @property
        def data(self) -> bytes:
            return self._data

    class Request(transport.Request):
        def __call__(
            self,
            url: str,
            method: str = "GET",
            body: bytes | None = None,
            headers: Mapping[str, str] | None = None,
            timeout: float | None = None,
            **kwargs: Any,
        ) -> Response:
            # Only the key file's token_uri, checked to be http(s) when it was read.
            req = urllib.request.Request(  # noqa: S310
                url, data=body, headers=dict(headers or {}), method=method
            )
            try:
                with urllib.request.urlopen(req, timeout=timeout or 30) as answer:  # noqa: S310
                    return Response(answer.status, dict(answer.headers.items()), answer.read())
            except urllib.error.HTTPError as exc:
                return Response(exc.code, dict(exc.headers.items()), exc.read())
            except OSError as exc:
                raise exceptions.TransportError(str(exc)) from exc  # type: ignore[no-untyped-call]

    return Request()


class GoogleAccessTokens:
    """Access tokens of one service account, kept fresh by a daemon thread."""

    def __init__(self, provider: str, key_file: str) -> None:
        try:
            from google.oauth2 import service_account
        except ImportError:  # pragma: no cover - google-auth is a dependency
            raise ConfigError(f"provider {provider!r}: google-auth is not installed") from None
        try:
            info = json.loads(Path(key_file).read_text(encoding="utf-8"))
            self._credentials = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
                info, scopes=[_CLOUD_PLATFORM]
            )
            token_uri = str(info.get("token_uri", ""))
            if not token_uri.startswith(("https://", "http://")):
                raise ValueError("token_uri")
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            # Never the file's content in the message: it holds a private key.
            raise ConfigError(
                f"provider {provider!r}: service_account_file is not a readable service "
                f"account key ({type(exc).__name__})"
            ) from None
        self._provider = provider
        self._request = _google_transport()
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"GoogleAccessTokens(provider={self._provider!r})"

    def token(self) -> str | None:
        """The current access token, or None while none could be obtained."""
        with self._lock:
            if self._token is not None and time.time() < self._expires_at:
                return self._token
        return None

    def refresh(self) -> bool:
        """Mint a new token now (blocking); False when Google refused or was unreachable."""
        from google.auth import exceptions

        try:
            self._credentials.refresh(self._request)
        except exceptions.GoogleAuthError as exc:
            log.warning(
                "provider %s: access token refresh failed: %s", self._provider, type(exc).__name__
            )
            return False
        expiry = self._credentials.expiry  # naive UTC datetime
        expires_at = (
            expiry.timestamp() - time.timezone if expiry is not None else time.time() + 3600
        )
        with self._lock:
            self._token = str(self._credentials.token)
            self._expires_at = expires_at
        return True

    def start(self) -> None:
        """Get a first token (blocking, so a broken key fails at start-up) and keep it fresh."""
        if not self.refresh():
            log.warning(
                "provider %s: no access token yet; retrying in the background", self._provider
            )
        self._thread = threading.Thread(
            target=self._run, name=f"tokens-{self._provider}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                due = self._expires_at - _REFRESH_MARGIN_S - time.time()
            if due > 0:
                self._stop.wait(min(due, 300))
                continue
            if not self.refresh():
                self._stop.wait(_RETRY_S)


class AwsSigner:
    """Signs Bedrock requests with the AWS credentials botocore finds for this process."""

    def __init__(self, provider: str, region: str) -> None:
        try:
            import botocore.session
        except ImportError:  # pragma: no cover - botocore is a dependency
            raise ConfigError(f"provider {provider!r}: botocore is not installed") from None
        self._provider = provider
        self._region = region
        self._session = botocore.session.Session()
        self._credentials = self._session.get_credentials()
        if self._credentials is None:
            raise ConfigError(
                f"provider {provider!r}: no AWS credentials found (environment, profile, web "
                "identity or instance role) to sign requests for gateway keys"
            )
        self._frozen = self._credentials.get_frozen_credentials()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # Refreshable credentials (web identity, instance roles) refresh inside
        # get_frozen_credentials, which may call STS: do that here, never on the request path.
        threading.Thread(target=self._run, name=f"aws-{provider}", daemon=True).start()

    def __repr__(self) -> str:
        return f"AwsSigner(provider={self._provider!r}, region={self._region!r})"

    def _run(self) -> None:
        while not self._stop.wait(60):
            try:
                frozen = self._credentials.get_frozen_credentials()
            except Exception as exc:  # keep the last credentials; try again later
                log.warning(
                    "provider %s: AWS credential refresh failed: %s",
                    self._provider,
                    type(exc).__name__,
                )
                continue
            with self._lock:
                self._frozen = frozen

    def stop(self) -> None:
        self._stop.set()

    def sign(
        self, method: str, url: str, headers: Iterable[tuple[str, str]], body: bytes
    ) -> list[tuple[str, str]]:
        """The headers that sign this request (``authorization``, ``x-amz-date``, and
        ``x-amz-security-token`` for temporary credentials); ``headers`` are the ones the
        signature covers besides ``host`` (send them unchanged)."""
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        with self._lock:
            frozen = self._frozen
        request = AWSRequest(method=method, url=url, data=body, headers=dict(headers))
        SigV4Auth(
            Credentials(frozen.access_key, frozen.secret_key, frozen.token), "bedrock", self._region
        ).add_auth(request)
        wanted = ("authorization", "x-amz-date", "x-amz-security-token")
        return [(k.lower(), v) for k, v in request.headers.items() if k.lower() in wanted]
