"""The data package's user-facing error (the trainer maps it to exit code 2; see trainer.errors)."""


class DataError(ValueError):
    """Bad input data: the message names the file, column (and row where it applies) and the problem."""
