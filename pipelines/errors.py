"""The one error base class of cbh and the exit codes the command line maps it to.

Every error a user can cause (a bad file, a bad parameter, a missing key, a refused stage)
derives from `CbhError`; `cbh` prints its message as one sentence on stderr and exits with
its `exit_code`. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_FAILURE = 1      # the command could not do its job (bad input, refused stage, gate closed)
EXIT_USAGE = 2        # the command line or params.yaml is wrong
EXIT_UNAVAILABLE = 3  # something the command needs is missing (a key, OCR, a server)
EXIT_REJECTED = 4     # `cbh promote`: the gate kept the champion (a decision, recorded; not a failure)


class CbhError(Exception):
    """An error the user can act on: its message is one sentence naming the file and the problem."""

    exit_code = EXIT_FAILURE


class UsageError(CbhError):
    """The command line asks for something impossible (a missing option, a malformed value)."""

    exit_code = EXIT_USAGE


class InputFileError(CbhError):
    """One input file cannot be used; `code` is the quarantine reason code recorded for it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

    def __reduce__(self):   # crosses process boundaries (pool, Dask) with its code
        return (type(self), (self.code, str(self)))
