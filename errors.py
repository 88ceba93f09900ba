"""The toolkit's typed errors. Libraries (models, loss, data, refinery, engine, torchscope) raise these
with messages that say what is wrong in the library's own terms; the scripts (cli/) turn them into the
one-line messages users see, naming the flag or file to change.

This module imports nothing from the project, so every package may raise these without an import
cycle.
"""


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
    """A write failed: disk full, no inodes, permissions."""
