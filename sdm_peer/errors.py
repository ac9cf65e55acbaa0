"""One small error hierarchy. Each error carries its wire code (DESIGN §4) and its exit code;
the CLI turns any of them into one line and that exit code, the server into one error answer."""


class SdmPeerError(Exception):
    code = "INTERNAL"
    exit_code = 1
    hint = None

    def __init__(self, message, *, hint=None):
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    @property
    def message(self):
        return str(self)


class BadInput(SdmPeerError):
    """The user's input (plan, settings, flags, a request) is wrong; nothing was changed."""

    code = "BAD_REQUEST"
    exit_code = 2


class PlanError(BadInput):
    pass


class SettingsError(BadInput):
    pass


class Unauthorized(SdmPeerError):
    code = "UNAUTHORIZED"
    exit_code = 2


class TooLarge(BadInput):
    code = "TOO_LARGE"


class LeaseLost(SdmPeerError):
    """The lease token no longer holds the experiment (expired and taken back, or finished)."""

    code = "LEASE_LOST"


class NoSuchExperiment(SdmPeerError):
    code = "NO_SUCH_EXPERIMENT"
    exit_code = 2


class NoSuchConfig(SdmPeerError):
    """No config of the run has the worker's shape."""

    code = "NO_SUCH_CONFIG"
    exit_code = 2


class Busy(SdmPeerError):
    code = "BUSY"


class ServerUnavailable(SdmPeerError):
    """The server could not be reached (after retries, where the caller allowed them)."""

    code = "UNAVAILABLE"
    exit_code = 3


class ProviderError(SdmPeerError):
    code = "PROVIDER"


_BY_CODE = {cls.code: cls for cls in (
    BadInput, Unauthorized, TooLarge, LeaseLost, NoSuchExperiment, NoSuchConfig, Busy, ServerUnavailable,
)}


def error_for(code, message):
    """The exception a client raises for an error answer from the server."""
    cls = _BY_CODE.get(code, SdmPeerError)
    error = cls(message)
    if cls is SdmPeerError:
        error.code = code
    return error
