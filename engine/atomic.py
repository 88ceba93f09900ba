"""Atomic file writes: a uniquely named temporary file in the same folder, fsync, rename, fsync of
the folder. The file under its real name is always whole, old or new; any OSError (disk full, no
inodes, permissions) becomes a StorageError and leaves the previous file as it was, and no
temporary behind (a killed write leaves one, which runs.remove_temporaries clears)."""
import os
import tempfile

import errors

TMP_PREFIX = ".tmp-"


def write_atomic(path, write, binary=True):
    """Call write(f) on a temporary file, then put it in place of `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".part", dir=folder)
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_dir(folder)
    except OSError as e:
        text = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise errors.StorageError(f"could not write {path}: {e.strerror or text}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def fsync_dir(folder):
    """Make a rename inside `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
