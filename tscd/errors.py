"""Exceptions that mean "bad input", not "bug": the command line prints their message on one line and exits 2.

:class:`~tscd.config.ConfigError` and :class:`~tscd.data.DataError` (both ``ValueError``) belong here too; see
:data:`tscd.cli.USER_ERRORS` for the full list.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (a file, a flag, the environment); the message says what to change."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, unreadable, corrupt or does not fit (a ``RuntimeError`` for older callers)."""


class UnavailableError(UserError, RuntimeError):
    """A requested feature is not available in this installation or on this machine."""
