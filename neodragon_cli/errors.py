"""One exception family for the whole tool.

A `NeodragonError` reaching the CLI prints one line (what went wrong, then what to try) and exits
with `exit_code`: 2 for user mistakes (bad arguments, bad recipe, unknown names), 1 for runtime
failures (a checkpoint that does not load, a device that is missing).
"""

from __future__ import annotations


class NeodragonError(Exception):
    """Base error. `hint` says what to try; `exit_code` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def __str__(self) -> str:
        return self.one_line()


class UsageError(NeodragonError):
    """The user asked for something malformed: exit 2."""

    exit_code = 2


class RecipeError(UsageError):
    """A recipe failed validation. Carries every problem found, not only the first."""

    def __init__(self, problems: list[str], *, hint: str | None = None):
        self.problems = list(problems)
        head = self.problems[0] if len(self.problems) == 1 else f"{len(self.problems)} problems in recipe"
        super().__init__(head, hint=hint)

    def one_line(self) -> str:
        if len(self.problems) == 1:
            return super().one_line()
        return "\n".join([f"{len(self.problems)} problems in recipe:"] + [f"  - {p}" for p in self.problems])


class UnknownNameError(UsageError):
    """An unknown component / recipe / option name; the message lists the known ones."""


class CheckpointError(NeodragonError):
    """A checkpoint folder or file is missing, malformed, or does not match the architecture."""


class ArtifactError(NeodragonError):
    """An output folder problem (exists and not empty, missing state, wrong parent)."""

    exit_code = 2
