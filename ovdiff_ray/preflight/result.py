"""The preflight's typed result: problems (one line each), what was found, what was loaded."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..recipe import Recipe
from ..vocab import Vocabulary


@dataclass(frozen=True)
class Problem:
    """One thing that stops the job: `thing` names it, `message` says what is wrong and what to do."""

    thing: str
    message: str

    def line(self) -> str:
        return f"{self.thing}: {self.message}"


@dataclass(frozen=True)
class Resources:
    """What the Ray a job would use has (or, with an autoscaler, can grow to)."""

    cpus: float
    gpus: float
    node_cpus: float  # the largest node's
    node_gpus: float
    source: str  # e.g. "this machine (a local Ray would start here)"


@dataclass
class Preflight:
    """The result: problems (empty = go), what was found (`notes`, for `--check`), and what was loaded."""

    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    vocab: Vocabulary | None = None
    recipe: Recipe | None = None
    resources: Resources | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, thing: str, message: str) -> None:
        self.problems.append(Problem(thing, message))

    def report(self, prog: str, file) -> None:
        """Print one `PROG: error: ...` line per problem."""
        for p in self.problems:
            print(f"{prog}: error: {p.line()}", file=file)
