"""`@command`: a command is declared on its handler, with its payload schema and where it runs.

A mixin writes its schema dataclass right above the handler and decorates the handler::

    @dataclass
    class Pause:
        reason: str = "manual"

    @command("pause", Pause, mutating=True, description="pause at the next batch boundary")
    def cmd_pause(self, p: Pause) -> dict: ...

so grepping a command's name finds its handler, payload and flag in one place. The session
collects every declaration of its class (`declared_commands`) and registers them with its router.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

ATTRIBUTE = "__onthefly_command__"


@dataclass(frozen=True)
class CommandDeclaration:
    """What `@command` records on a handler."""

    name: str
    schema: type | None
    mutating: bool
    description: str


def command(name: str, schema: type | None = None, *, mutating: bool, description: str) -> Callable[[F], F]:
    """Declare the decorated method as the handler of wire command `name`.

    `mutating` handlers run on the training thread at a batch boundary (through the pause gate);
    the others are answered at once by the command thread and must only read state.
    """
    if not isinstance(mutating, bool):
        raise TypeError(f"mutating for {name!r} must be a bool, got {mutating!r}")

    def decorate(handler: F) -> F:
        setattr(handler, ATTRIBUTE, CommandDeclaration(name, schema, mutating, description))
        return handler

    return decorate


def declared_commands(cls: type) -> list[tuple[str, CommandDeclaration]]:
    """(attribute name, declaration) of every `@command` method of `cls` and its bases, once each.

    A subclass may not redeclare a command name: one command, one handler.
    """
    found: dict[str, tuple[str, CommandDeclaration]] = {}
    for klass in reversed(cls.__mro__):
        for attr, value in vars(klass).items():
            declaration = getattr(value, ATTRIBUTE, None)
            if declaration is None:
                continue
            previous = found.get(declaration.name)
            if previous is not None and previous[0] != attr:
                raise TypeError(
                    f"command {declaration.name!r} is declared twice ({previous[0]} and {klass.__name__}.{attr})"
                )
            found[declaration.name] = (attr, declaration)
    return sorted(found.values(), key=lambda item: item[1].name)
