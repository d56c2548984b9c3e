"""kvmanager's error hierarchy: one class per Status code (proto/include/proto/status.h).

Every error is a ``kvmanager.Error`` carrying ``.code`` (the wire value), ``.code_name`` and
``.message``. Some are also the matching built-in, so ordinary ``except`` clauses work:
``InvalidArgument`` is a ``ValueError``, ``NotFound`` a ``KeyError``, ``TimedOut`` a
``TimeoutError``, ``Unavailable`` a ``ConnectionError``, ``PermissionDenied`` a ``PermissionError``.
"""


class Error(Exception):
    """A kvmanager Status error: ``.code`` (int), ``.code_name`` (str), ``.message`` (str)."""

    __module__ = "kvmanager"

    code = 0
    code_name = "Unknown"

    def __init__(self, message="", code=None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self):  # KeyError would otherwise print the repr of its argument
        return f"{self.code_name}: {self.message}"


def _cls(name, code, *bases):
    return type(name, (Error,) + bases, {"code": code, "code_name": name, "__module__": "kvmanager"})


InvalidArgument = _cls("InvalidArgument", 1, ValueError)
NotFound = _cls("NotFound", 2, KeyError)
AlreadyExists = _cls("AlreadyExists", 3)
FailedPrecondition = _cls("FailedPrecondition", 4)
OutOfRange = _cls("OutOfRange", 5)
Busy = _cls("Busy", 6)
TryAgain = _cls("TryAgain", 7)
TimedOut = _cls("TimedOut", 8, TimeoutError)
Cancelled = _cls("Cancelled", 9)
NoSpace = _cls("NoSpace", 10)
Unauthenticated = _cls("Unauthenticated", 11)
PermissionDenied = _cls("PermissionDenied", 12, PermissionError)
Unavailable = _cls("Unavailable", 13, ConnectionError)
Corruption = _cls("Corruption", 14)
Unimplemented = _cls("Unimplemented", 15)
Internal = _cls("Internal", 16)

BY_CODE = {c.code: c for c in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition,
                               OutOfRange, Busy, TryAgain, TimedOut, Cancelled, NoSpace,
                               Unauthenticated, PermissionDenied, Unavailable, Corruption,
                               Unimplemented, Internal)}
__all__ = ["Error"] + [c.__name__ for c in BY_CODE.values()]


def _from_status(code, name, message):
    """Called by the extension: the exception instance for a Status."""
    cls = BY_CODE.get(code, Internal)
    return cls(message, code)
