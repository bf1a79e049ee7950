"""Exceptions that carry an exit code, so the command line can end every rank the same way."""

EXIT_OK = 0
EXIT_FAILURE = 1  # a bug or an unexpected error: the message carries a traceback
EXIT_USER_ERROR = 2  # bad input: a job file, a teacher, a data set, a launch
EXIT_GATE = 3  # the run finished, but the student missed a bar of the job's [gate]
EXIT_PROBLEM = 4  # the run finished with its report, but a step after the student failed


class PbkdError(Exception):
    """Base class of the errors this tool raises on purpose."""

    exit_code = EXIT_FAILURE


class UserError(PbkdError):
    """Input the user can fix. One clear message, no traceback, exit code 2."""

    exit_code = EXIT_USER_ERROR


class RemoteError(PbkdError):
    """An exception raised on another rank, with that rank's traceback as text."""

    def __init__(self, rank, what, traceback_text, exit_code=EXIT_FAILURE):
        self.rank = rank
        self.what = what
        self.traceback_text = traceback_text
        self.exit_code = exit_code
        super().__init__(f"rank {rank} failed while {what}:\n{traceback_text.rstrip()}")
