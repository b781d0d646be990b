"""What a task is: a template turning one dataset row into an :class:`Example`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar


@dataclass
class Example:
    """One prompt with either options to score (classification) or gold answers (generation)."""

    prompt: str
    """Text the model conditions on; the answer follows it directly."""

    target: str
    """What the model is trained to continue the prompt with (loss is taken on these tokens only)."""

    options: list[str] = field(default_factory=list)
    """Classification: every candidate continuation; the prediction is the most likely one."""

    label: int | list[int] | None = None
    """Classification: index (or indices, e.g. ReCoRD) of the correct option(s)."""

    answers: list[str] = field(default_factory=list)
    """Generation: gold answers for token F1 (the best match counts)."""

    messages: list[dict] | None = None
    """Chat formats: the conversation (``{"role", "content"}`` messages), rendered with the chat
    template at encoding; every assistant turn is trained. ``prompt``/``target`` are then unused."""


@dataclass
class TaskData:
    train: list[Example]
    dev: list[Example]
    test: list[Example]


class Task:
    """A task: where its data lives and how a row becomes an :class:`Example`."""

    name: ClassVar[str]
    kind: ClassVar[str] = "classification"  # or "generation", "language_modeling"
    hub_path: ClassVar[str | None] = None
    hub_name: ClassVar[str | None] = None
    train_split: ClassVar[str] = "train"
    test_split: ClassVar[str] = "validation"
    columns: ClassVar[tuple[str, ...]] = ()
    """Columns a row must have (checked before training, so a wrong file fails with a clear message)."""
    chat: ClassVar[bool] = False
    """Whether examples are conversations rendered with a chat template (``task.chat_template``)."""

    def __init__(self, **options):
        self.options = options

    @property
    def metric(self) -> str:
        return {"classification": "accuracy", "generation": "f1", "language_modeling": "loss"}[self.kind]

    def example(self, row: dict) -> Example:
        """The example of one row. A ``KeyError``, ``TypeError`` or ``ValueError`` raised here is
        reported with the file and row it came from."""
        raise NotImplementedError

    def examples(self, row: dict) -> list[Example]:
        """Rows that expand into several examples (none here) override this."""
        return [self.example(row)]
