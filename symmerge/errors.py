"""The one exception type symmerge raises for bad input: the CLI prints its message on one line and exits 2."""

import reprlib


class SymmergeError(Exception):
    """A problem with the user's input (models, files, options), with a message that says what to do."""


class UnsupportedFamily(SymmergeError):
    """A model symmerge cannot align (its family, or a config option of it, is not supported); it still merges
    without alignment (``alignment: none``)."""


def shorten(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters with "…", without ever rendering an unbounded value whole."""
    r = reprlib.Repr()
    r.maxstring = r.maxother = r.maxlong = limit
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = r.maxfrozenset = r.maxdeque = r.maxarray = 8
    r.maxlevel = 3
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return repr(value[: limit - 4])[: limit - 1] + "…"
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def cut(text: str, limit: int = 80) -> str:
    """``text`` as it is (no quotes), cut to ``limit`` characters with "…"."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"
