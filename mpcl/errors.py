"""Exceptions raised at the project's boundaries (files, configs, model packages).

Each carries one sentence that names the offending file or key, so command-line tools can print it
as-is instead of a traceback.
"""


class MPCLError(Exception):
    """Base class of every error this project raises on purpose."""


class InputError(MPCLError, ValueError):
    """A file or array given by the user cannot be used (missing, corrupt, wrong shape, bad values)."""


class ConfigError(MPCLError, ValueError):
    """A configuration file or key is invalid."""


class ModelPackageError(MPCLError, ValueError):
    """A model package (model.json + files) is missing, malformed, of unknown version, or inconsistent."""


class Cancelled(MPCLError):
    """A run was stopped through its ``cancel_event``; nothing was written."""


class OutputError(MPCLError):
    """An output cannot be written (full or read-only disk, a folder in the way); nothing is left under
    its final name."""
