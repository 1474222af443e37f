"""Exceptions raised at srcproj's public boundary.

Every error says what is wrong and how to fix it; all derive from :class:`SrcprojError`
so callers can catch the library's errors as one family.
"""


class SrcprojError(Exception):
    """Base class of every error srcproj raises on purpose."""


class ConfigurationError(SrcprojError, ValueError):
    """An argument (trajectory, projection size, task option...) is invalid."""


class DataError(SrcprojError, ValueError):
    """A data set is empty, has the wrong shape, or holds labels the model cannot have."""


class CheckpointMismatchError(SrcprojError, ValueError):
    """A checkpoint does not fit the model."""


class NonFiniteGradientError(SrcprojError, FloatingPointError):
    """A per-example gradient holds NaN or inf."""


class StoreMismatchError(SrcprojError):
    """A store on disk was made for another model, projection or trajectory."""


class StoreError(SrcprojError):
    """A store path cannot be used (it is a file, it is not a srcproj store, it is damaged)."""
