"""The errors demandstream raises on purpose: one root, and a family the user can fix.

:class:`DemandstreamError` is the root. :class:`UserError` and its subclasses are mistakes the user can
fix (a missing file, a bad option or setting, unreadable data, a corrupt checkpoint, an unreachable
broker): the command line prints their message as one line on stderr and exits with status 2. Every
other exception is a bug and keeps its traceback.

The user errors of the library also subclass the built-in exception a caller would have caught
before (``ValueError``, ``FileNotFoundError``), so ``except ValueError`` keeps working.

Where the rest of the family lives: :class:`demandstream.model.core.checkpoint.CheckpointError`,
:class:`demandstream.stream.settings.SettingsError`, :class:`demandstream.stream.admin.KafkaUnavailable` and
:class:`demandstream.stream.worker.faust_patches.UnsupportedFaustVersion` (``stream`` imports ``model``, never the reverse).

>>> from demandstream.model.data.split import parse_time
>>> try:
...     parse_time("yesterday")
... except UserError as e:
...     print(type(e).__name__, isinstance(e, ValueError))
OptionError True
"""

from __future__ import annotations


class DemandstreamError(Exception):
    """Root of every exception demandstream raises on purpose."""


class UserError(DemandstreamError):
    """An error the user can fix; the command line prints its message as one line and exits 2."""


class OptionError(UserError, ValueError):
    """An option or argument whose value cannot be used: an unknown device or training option, a time
    that does not parse, a split whose ends are out of order."""


class DataError(UserError, ValueError):
    """Input data that cannot be read as the format it was given as (wrong header, unknown format)."""


class DataNotFound(UserError, FileNotFoundError):
    """Input paths or globs that name no data file."""


class MissingExtra(UserError, RuntimeError):
    """An optional dependency the command needs is not installed (the message names the pip extra)."""
