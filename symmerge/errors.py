"""The one exception type symmerge raises for bad input: the CLI prints its message on one line and exits 2."""


class SymmergeError(Exception):
    """A problem with the user's input (models, files, options), with a message that says what to do."""
