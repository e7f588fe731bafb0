"""The one exception type users see: it says what was wrong, the value seen, and what to do."""


class DraftsmithError(Exception):
    """A user-facing error. The CLI prints its message without a traceback and exits with 2."""

    def __init__(self, what: str, seen: object = None, fix: str | None = None):
        parts = [what]
        if seen is not None:
            parts.append(f"(got: {seen!r})")
        msg = " ".join(parts)
        if fix:
            msg += f". {fix}"
        super().__init__(msg)
