"""One exception hierarchy; each class maps to a CLI exit code.

User errors (bad config, bad data, an exhausted budget) are shown as one paragraph
that says what to fix, without a traceback.
"""

from __future__ import annotations

import re


class WardroundError(Exception):
    """Base of every error wardround raises on purpose."""

    exit_code = 1
    title = "wardround error"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n{self.hint}" if self.hint else self.message


class ConfigError(WardroundError):
    """A config file or option is missing, unknown or out of range."""

    exit_code = 2
    title = "configuration error"


class DataError(WardroundError):
    """A site's data cannot be used as declared."""

    exit_code = 3
    title = "data error"


class SourceUnreachable(DataError):
    """A site's database or PACS cannot be reached, or refuses its credentials.

    The message names the source and the reason; it never holds a secret.
    """

    title = "data source unreachable"


class ModelMismatchError(WardroundError):
    """A site was asked to train against a base model other than its own."""

    exit_code = 4
    title = "base-model mismatch"


class PolicyRefusal(WardroundError):
    """A site refuses a request by its own policy: an expected answer, not a fault.

    Its message says why, so a site logs it as one line, without a traceback.
    """


class EgressViolation(WardroundError):
    """An outgoing message holds something other than the declared adapter and numbers."""

    exit_code = 5
    title = "egress refused"


class PrivacyBudgetExhausted(PolicyRefusal):
    """Training would spend more privacy than the site allows."""

    exit_code = 6
    title = "privacy budget exhausted"


class PrivacyPolicyRefused(PolicyRefusal):
    """A run asks for less privacy than the site's own floor allows."""

    exit_code = 8
    title = "privacy policy refused"


class AnswerRefused(PrivacyPolicyRefused):
    """The coordinator asks more of a site than the run it approved allows."""

    title = "answer refused"


class SecureAggregationRefused(PolicyRefusal):
    """A train message breaks the SecAgg+ protocol or settings the site approved."""

    exit_code = 9
    title = "secure aggregation refused"


class FederationError(WardroundError):
    """A round could not complete (too few sites replied, a site failed)."""

    exit_code = 7
    title = "federation error"


_KIND_PREFIX = re.compile(r"\[([A-Za-z_][A-Za-z0-9_]*)\] ")


def safe_error_reason(exc: BaseException) -> str:
    """The error text that may leave the site for ``exc``.

    Wardround's own errors carry controlled text; anything else may quote data, so only
    its class name leaves. The ``[ClassName] `` prefix is read back by
    :func:`error_kind`.
    """
    if isinstance(exc, WardroundError):
        return f"[{type(exc).__name__}] {exc.title}: {exc.message}"
    return f"[{type(exc).__name__}] the site failed; details are in the site's log"


def error_kind(reason: str | None) -> str | None:
    """The exception class name a site put in front of an error reason, if any."""
    match = _KIND_PREFIX.match(reason or "")
    return match.group(1) if match else None
