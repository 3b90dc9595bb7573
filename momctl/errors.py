"""Errors a user can cause: the CLI prints them as one red line and exits 1."""


class MomctlError(Exception):
    """A problem with the user's input or environment, with the fix in its message."""
