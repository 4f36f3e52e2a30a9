"""User-facing errors. Each message names the problem and what to do about it."""


class WeightsmithError(Exception):
    """An error caused by the user's input. The CLI prints it without a traceback."""


class CancelledError(WeightsmithError):
    """The user cancelled a long operation; nothing was written."""


def require(cond: bool, message: str) -> None:
    if not cond:
        raise WeightsmithError(message)
