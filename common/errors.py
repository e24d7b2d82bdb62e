"""One exception hierarchy; each class maps to a CLI exit code.

User errors (bad config, bad data, an exhausted budget) are shown as one paragraph
that says what to fix, without a traceback.
"""

from __future__ import annotations


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


class ModelMismatchError(WardroundError):
    """A site was asked to train against a base model other than its own."""

    exit_code = 4
    title = "base-model mismatch"


class EgressViolation(WardroundError):
    """An outgoing message holds something other than the declared adapter and numbers."""

    exit_code = 5
    title = "egress refused"


class PrivacyBudgetExhausted(WardroundError):
    """Training would spend more privacy than the site allows."""

    exit_code = 6
    title = "privacy budget exhausted"


class FederationError(WardroundError):
    """A round could not complete (too few sites replied, a site failed)."""

    exit_code = 7
    title = "federation error"
