"""The one exception tree of the adapter.

Every error knows the OperationOutcome issue code it stands for
(https://hl7.org/fhir/R4/valueset-issue-type.html) and the HTTP status an API route answers with.
Errors are raised where they happen, translated at the boundary (``raise ... from exc``) and
rendered once: by the API's exception handler as an OperationOutcome, by the CLI as one line.

    AdapterError
     +-- InputError                (400, invalid)     bad input that cannot be read at all
     |    +-- ParseError           (400, structure)   not JSON / not XML / truncated / bad encoding
     |    +-- UnsafeXmlError       (400, security)    DTD, entity declarations, external references
     |    +-- InputTooLargeError   (413, too-costly)  over a size or depth limit
     |    +-- UnknownTypeError     (400, not-supported) resourceType that R4 does not define
     +-- ValidationFailed          (422, processing)  carries the issues that failed validation
     +-- NotFound                  (404, not-found)   no such resource or version (store)
     +-- UnknownResourceType       (404, not-supported) a URL names a type R4 does not have (API)
     +-- Gone                      (410, deleted)     the resource or version is deleted (store)
     +-- VersionConflict           (412, conflict)    If-Match names another version (store)
     +-- Conflict                  (409, conflict)    clashes with the store's state or another change
     +-- NotAcceptable             (406, not-supported) no response format the client accepts (API)
     +-- UnsupportedMediaType      (415, not-supported) a request body in a format we do not read (API)
     +-- MessageRejected           (its own status)   a FHIR message ``$process-message`` did not process:
                                                      the issues to answer with and the headers to echo (API)
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AdapterError",
    "Conflict",
    "Gone",
    "InputError",
    "InputTooLargeError",
    "MessageRejected",
    "NotAcceptable",
    "NotFound",
    "ParseError",
    "UnknownResourceType",
    "UnknownTypeError",
    "UnsafeXmlError",
    "UnsupportedMediaType",
    "ValidationFailed",
    "VersionConflict",
]


class AdapterError(Exception):
    """Base of every error the adapter raises on purpose."""

    issue_code = "exception"
    status = 500
    #: Set by a store's transaction: the index of the operation that failed.
    operation: int | None = None

    def __init__(self, message: str, *, expression: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.expression = expression

    def issue(self) -> dict[str, Any]:
        """This error as one ``OperationOutcome.issue``."""
        issue: dict[str, Any] = {"severity": "error", "code": self.issue_code, "diagnostics": self.message}
        if self.expression:
            issue["expression"] = [self.expression]
        return issue


class InputError(AdapterError):
    issue_code = "invalid"
    status = 400


class ParseError(InputError):
    issue_code = "structure"


class UnsafeXmlError(InputError):
    issue_code = "security"


class InputTooLargeError(InputError):
    issue_code = "too-costly"
    status = 413


class UnknownTypeError(InputError):
    issue_code = "not-supported"


class ValidationFailed(AdapterError):
    issue_code = "processing"
    status = 422

    def __init__(self, message: str, issues: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.issues = issues


class NotFound(AdapterError):
    issue_code = "not-found"
    status = 404


class UnknownResourceType(AdapterError):
    issue_code = "not-supported"
    status = 404


class Gone(AdapterError):
    issue_code = "deleted"
    status = 410


class VersionConflict(AdapterError):
    """If-Match named another version than the current one (https://hl7.org/fhir/R4/http.html#concurrency)."""

    issue_code = "conflict"
    status = 412


class Conflict(AdapterError):
    issue_code = "conflict"
    status = 409


class NotAcceptable(AdapterError):
    issue_code = "not-supported"
    status = 406


class UnsupportedMediaType(AdapterError):
    issue_code = "not-supported"
    status = 415


class MessageRejected(AdapterError):
    """A FHIR message that ``$process-message`` did not process (https://hl7.org/fhir/R4/messaging.html).

    It carries what the answer needs: the HTTP status, the issues (each with the messaging
    standard's error code, BaRS ``https://fhir.nhs.uk/CodeSystem/http-error-codes``) and the
    headers to send along (BaRS echoes ``X-Request-Id`` and ``X-Correlation-Id`` on errors too).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        issues: list[dict[str, Any]],
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.issues = issues
        self.headers = dict(headers or {})
        if issues and isinstance(issues[0].get("code"), str):
            self.issue_code = issues[0]["code"]
