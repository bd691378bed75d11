"""The data path's user-fixable error (a `dataset_tools.errors.UserError`), apart from the modules that raise it so
that an engine and the builder that makes it both import it without importing each other."""

from __future__ import annotations

from dataset_tools.errors import UserError


class DataError(UserError):
    """The data named by the config cannot be loaded (missing, not a .beton, labels out of range)."""
