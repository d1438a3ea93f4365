"""Error types and the process exit codes they map to.

User errors (bad job, bad CSV, missing key file, corrupt run directory…) are printed as one line
by the CLI, never as a traceback. Exit codes are documented in the README.
"""

EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug: traceback is printed
EXIT_USER = 2  # bad input: one-line message naming what is wrong
EXIT_AUDIT = 3  # `twin audit` found a broken chain or tampered result
EXIT_INTERRUPTED = 75  # SIGTERM/SIGINT: chunks flushed, rerun the same command to resume (EX_TEMPFAIL)


class TwinError(Exception):
    """Base class for errors the user can fix; printed as one line, exit code EXIT_USER."""

    exit_code = EXIT_USER


class JobError(TwinError):
    """A job file is malformed: the message names the key, the value and what is allowed."""


class CohortError(TwinError):
    """A cohort cannot be built (bad CSV, missing pseudonymisation key, empty cohort…)."""


class StoreError(TwinError):
    """A run directory cannot be used (unreadable/corrupt file, different job, …)."""


class AuditError(TwinError):
    exit_code = EXIT_AUDIT


class Interrupted(Exception):
    """Raised inside a chunk when a termination signal asks the run to stop now."""
