"""One exception type for bad input: the CLI prints it as one line and exits non-zero."""


class WBCError(Exception):
    """Bad input or state the user can fix (file, row and reason in the message)."""


class TrainingDiverged(WBCError):
    """A training epoch ended with a non-finite loss or gradient: the weights are lost, the recipe needs changing."""


def where(path, row=None) -> str:
    """`path` or `path:row` for error messages; row is the 1-based line in the file (header = 1)."""
    return f"{path}" if row is None else f"{path}:{row}"


def first_line(e: BaseException) -> str:
    """An exception's first message line for a one-line error, or its type's name when the message is empty."""
    lines = str(e).splitlines()
    return lines[0] if lines else type(e).__name__
