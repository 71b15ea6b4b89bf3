"""Errors raised by the storage layer for mistakes a caller can fix."""

from __future__ import annotations


class StorageError(Exception):
    """Base class of the storage layer's own errors."""


class InvalidSearchError(StorageError, ValueError):
    """The search text cannot be searched for (empty, only whitespace, or too long)."""


class InvalidCursorError(StorageError, ValueError):
    """A pagination cursor that this layer did not produce, or one that was altered."""


class GroupExistsError(StorageError, ValueError):
    """A group with this (group_type, name) already exists."""


class GroupNotFoundError(StorageError, LookupError):
    """No group has this id."""
