"""The one exception type that the CLI turns into a single error line.

Anything a user can get wrong (a path, a checkpoint, a bit-width, a dataset) is raised as
`UserError` with a message that names the problem and the fix; everything else is a bug and
keeps its traceback.
"""

_WORKER_PREFIX = "Caught "  # torch's DataLoader re-raises a worker's exception as type(exc)(message with traceback)


class UserError(Exception):
    """A problem with the user's input, reported as one line with a fix and exit code 2."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None) -> None:
        if fix is None and problem.startswith(_WORKER_PREFIX) and "Original Traceback" in problem:
            # Raised in a DataLoader worker (a file that will not decode): keep the worker's own line, not its traceback.
            last = [line for line in problem.splitlines() if line.strip()][-1]
            problem = last.split(f"{type(self).__name__}: ", 1)[-1]
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} ({fix})" if fix else problem)

    def __str__(self) -> str:
        return f"{self.problem}; {self.fix}" if self.fix else self.problem

    def __reduce__(self) -> tuple[type["UserError"], tuple[str, str | None]]:
        return type(self), (self.problem, self.fix)


class CheckFailed(UserError):
    """A result that must not ship (an export that fails its checks); exit code 1, like a failed gate."""

    exit_code = 1
