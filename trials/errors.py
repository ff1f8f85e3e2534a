"""Errors that are the user's to fix (bad field, missing file). The CLI prints their message on
one line and exits 2; everything else is a bug and keeps its traceback."""


class UserError(Exception):
    """A mistake in the user's input: the message names the field or file and what to do."""


class DatasetMissingError(UserError):
    """A dataset's files are not where they should be; the message says what and where."""
