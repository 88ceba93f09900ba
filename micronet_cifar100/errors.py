"""The toolkit's typed errors. Libraries (models, loss, data, refinery, engine, torchscope) raise these
with messages that say what is wrong in the library's own terms; the scripts (cli/) turn them into the
one-line messages users see, naming the flag or file to change.

This module imports nothing from the project, so every package may raise these without an import
cycle.
"""
import errno

# A one-line message quotes at most this much of an underlying error's own text.
QUOTE_CHARS = 160


def first_line(e, limit=QUOTE_CHARS):
    """The first line of an exception's text (or of a string), cut to `limit` characters; the
    exception's type name when it has no text."""
    lines = str(e).strip().splitlines()
    if not lines:
        return type(e).__name__ if isinstance(e, BaseException) else ""
    return lines[0][:limit]


class ToolkitError(Exception):
    """A problem with the user's input (a value, a file, a folder, the data), not a bug.

    `setting` names the option the problem is about, as a Python identifier (e.g. "train_limit");
    the command-line front ends map it to their flag.
    """

    def __init__(self, message, *, setting=None):
        super().__init__(message)
        self.setting = setting


class ConfigError(ToolkitError, ValueError):
    """A setting's value is out of range or inconsistent with another."""


class DataError(ToolkitError):
    """The CIFAR-100 files: missing, unreadable, corrupt or not downloadable."""


class DataNotFound(DataError):
    """No data where it was looked for (and no download was allowed)."""


class DownloadFailed(DataError):
    """The download of CIFAR-100 failed."""


class DataPermission(DataError):
    """The data exists but cannot be read (permissions)."""


class CheckpointError(ToolkitError):
    """A checkpoint file: missing, unreadable, unsafe, or of another model."""


class UnsafeCheckpoint(CheckpointError):
    """Unpickling the file would call code: refused."""


class ArchitectureMismatch(CheckpointError):
    """The file's weights belong to another architecture than the model built."""


class RunError(ToolkitError):
    """A training run cannot go on (resume mismatches, run folder problems, non-finite loss)."""


class StorageError(RunError):
    """A file or folder could not be written. `cause` says why, when the OS said: "full" (no space
    or inodes), "denied" (permissions) or "read-only" (the file system); None otherwise."""

    def __init__(self, message, *, setting=None, cause=None):
        super().__init__(message, setting=setting)
        self.cause = cause


_CAUSES = {errno.ENOSPC: "full", errno.EDQUOT: "full", errno.EACCES: "denied", errno.EPERM: "denied",
           errno.EROFS: "read-only"}


def storage_error(path, e, doing="write", setting=None):
    """The StorageError for an OSError `e` met writing `path`: one line with the OS's reason."""
    return StorageError(f"could not {doing} {path}: {e.strerror or first_line(e)}", setting=setting,
                        cause=_CAUSES.get(e.errno))
