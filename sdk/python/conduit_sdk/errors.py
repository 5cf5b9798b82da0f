"""The SDK's errors. Every one has a stable ``kind``, so that apps never match message text.

Kinds of the gateway's token endpoints are the last part of the problem ``type`` the gateway
answers with (``urn:conduit:exchange:<kind>``, docs/identity-providers.md): ``token-invalid``,
``token-expired``, ``subject-revoked``, ``session-ended``, ``no-rule-matched``,
``domain-not-found``, ``provider-not-found``, ``invalid-request``, ``rate-limited``,
``provider-unreachable``, ``provider-misconfigured``. The SDK adds ``network`` (the gateway
could not be reached or answered something else than a problem document),
``bad-credentials`` and ``not-authorized`` (the broker refused the credentials: MQTT reason
codes 0x86 and 0x87, and the others of authentication), ``refused`` (a publish or subscribe
the broker refused), ``offline-queue-full`` and ``not-connected``.
"""

from __future__ import annotations

# Kinds after which only a new external token (a new sign-in in the app) helps.
TERMINAL = frozenset(
    {
        "token-invalid",
        "token-expired",
        "subject-revoked",
        "session-ended",
        "no-rule-matched",
        "domain-not-found",
        "provider-not-found",
        "invalid-request",
    }
)


class ConduitError(Exception):
    """Base of the SDK's errors: ``kind`` (stable), ``detail`` (for people), ``status`` (the
    HTTP status, when the gateway's HTTP API answered), ``retry_after`` (seconds, when the
    gateway said when to try again)."""

    def __init__(
        self,
        kind: str,
        detail: str,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        self.status = status
        self.retry_after = retry_after

    @property
    def terminal(self) -> bool:
        """Whether retrying cannot help: the app must sign in again (a new external token)."""
        return self.kind in TERMINAL


class TokenError(ConduitError):
    """The exchange or refresh of credentials failed (``POST /auth/exchange``,
    ``/auth/refresh``)."""


class AuthError(ConduitError):
    """The broker refused the credentials: at CONNECT, at a re-authentication, or by ending the
    connection (revoked, expired). ``reason_code`` is the MQTT reason code."""

    def __init__(self, kind: str, detail: str, reason_code: int) -> None:
        super().__init__(kind, detail)
        self.reason_code = reason_code


class RefusedError(ConduitError):
    """The broker refused a publish or a subscription (``reason_code``, MQTT)."""

    def __init__(self, detail: str, reason_code: int) -> None:
        super().__init__("refused", detail)
        self.reason_code = reason_code
