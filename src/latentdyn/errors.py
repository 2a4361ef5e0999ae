"""Errors whose message is written for the user: shown as they are, never as a repr inside another error."""

from __future__ import annotations


class UserFacingError(Exception):
    """An error whose message says what went wrong and what to do about it (several lines, perhaps).

    Wrappers that catch and re-raise (Hydra's ``instantiate``) turn it into a one-line repr; the CLI and the
    run records unwrap it again with :func:`user_facing`.
    """


def user_facing(exc: BaseException) -> BaseException:
    """The first :class:`UserFacingError` in ``exc``'s chain of causes, or ``exc`` itself if there is none."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, UserFacingError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return exc
