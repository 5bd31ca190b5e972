"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class MptqError(Exception):
    """An error caused by the user's input (bad file, bad flag, unsupported graph)."""
