"""The closed set of errors services raise.

Only the API layer turns these into gRPC status codes (agent/api/interceptor.py);
nothing else decides a status code. Messages are shown to clients verbatim, so
they must be complete sentences that name the offending field or object and
never carry a traceback.
"""

from __future__ import annotations


class PodvisorError(Exception):
    """Base of every error a client may see."""

    code_name = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(PodvisorError):
    """The request is malformed; ``field`` names the offending field path."""

    code_name = "INVALID_ARGUMENT"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFound(PodvisorError):
    code_name = "NOT_FOUND"


class AlreadyExists(PodvisorError):
    code_name = "ALREADY_EXISTS"


class FailedPrecondition(PodvisorError):
    code_name = "FAILED_PRECONDITION"


class ResourceExhausted(PodvisorError):
    code_name = "RESOURCE_EXHAUSTED"


class Unavailable(PodvisorError):
    """A dependency (libvirt, a registry, a CNI plugin) cannot be reached."""

    code_name = "UNAVAILABLE"


class Unauthenticated(PodvisorError):
    """A registry refused the credentials given (or none were given)."""

    code_name = "UNAUTHENTICATED"


class DeadlineExceeded(PodvisorError):
    code_name = "DEADLINE_EXCEEDED"


class Unimplemented(PodvisorError):
    code_name = "UNIMPLEMENTED"


class Internal(PodvisorError):
    """A bug or an unexpected state; the log has the details."""

    code_name = "INTERNAL"


class GuestNotReady(Unavailable):
    """A way into a guest (its SSH server, its agent) does not answer yet: the
    guest may still be booting. Callers that can wait retry on this one."""


class GuestAgentNotReady(GuestNotReady):
    """The guest agent is not connected or did not answer in time."""


class GuestAgentRefused(PodvisorError):
    """The guest agent answered a command with an error (a program it could not
    start, say); ``message`` is the agent's. Callers decide what it means."""

    code_name = "FAILED_PRECONDITION"
