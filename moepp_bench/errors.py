"""The one error type commands raise for bad input; the app prints it as one line and exits 2."""


class BenchError(Exception):
    """Bad input or an impossible request. The message names the problem and the fix, on one line."""
