"""A simulated SIGKILL at one file-system event, for any script run with PYTHONPATH=tests/killer (Python
imports this sitecustomize module at start-up). Used only by tests/test_crash.py.

Two ways to choose the moment, both killing with os._exit(137), which skips every `finally` and atexit
handler as a real SIGKILL does (temporaries stay, the kernel drops the locks):

- By rename. KILL_LOG=PATH appends every renamed destination's basename (one a line) and kills
  nothing; KILL_FILE=NAME, KILL_NTH=N (1-based) and KILL_WHEN=before|after kill just before or just
  after the N-th rename onto a file called NAME.
- By event number. With KILL_ROOT=FOLDER, every event on a path under FOLDER is counted: a folder
  made (os.mkdir, which os.makedirs and tempfile.mkdtemp call), a file created or opened for writing
  (os.open with O_CREAT, as tempfile.mkstemp and a lock file do; open() in a writing mode), a rename
  (os.replace, os.rename) and a removal (os.unlink, os.remove, os.rmdir, also inside shutil.rmtree).
  KILL_EVENT=K kills just before the K-th (1-based); KILL_EVENTS=PATH appends each as
  "N KIND PATH-UNDER-FOLDER". Only events under FOLDER count, so the sequence does not depend on
  caches elsewhere (matplotlib's, torch's), and a run's sequence is the same every time.

Killing "after" event K leaves the disk as killing "before" event K+1 does (only file contents are
written in between, into temporaries that no rename has published), so numbered kills are all "before".
"""
import builtins
import os

_real = {name: getattr(os, name) for name in ("replace", "rename", "mkdir", "open", "unlink", "remove", "rmdir")}
_real_open = builtins.open
_seen = {}
_count = [0]
_ROOT = os.path.abspath(os.environ["KILL_ROOT"]) if os.environ.get("KILL_ROOT") else None
_WRITING = set("wax+")


def _under_root(path, dir_fd=None):
    if _ROOT is None or isinstance(path, int):
        return None
    path = os.fsdecode(path)
    if dir_fd is not None and not os.path.isabs(path):
        path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
    path = os.path.abspath(path)
    if path == _ROOT or path.startswith(_ROOT + os.sep):
        return os.path.relpath(path, _ROOT)
    return None


def _event(kind, path, dir_fd=None):
    where = _under_root(path, dir_fd)
    if where is None:
        return
    _count[0] += 1
    if os.environ.get("KILL_EVENTS"):
        with _real_open(os.environ["KILL_EVENTS"], "a") as f:
            f.write(f"{_count[0]} {kind} {where}\n")
    if _count[0] == int(os.environ.get("KILL_EVENT", "0")):
        os._exit(137)


def _by_rename(real):
    def rename(src, dst, *args, **kwargs):
        _event("rename", dst, kwargs.get("dst_dir_fd"))
        name = os.path.basename(os.fspath(dst))
        if os.environ.get("KILL_LOG"):
            with _real_open(os.environ["KILL_LOG"], "a") as f:
                f.write(name + "\n")
        _seen[name] = _seen.get(name, 0) + 1
        hit = name == os.environ.get("KILL_FILE") and _seen[name] == int(os.environ.get("KILL_NTH", "0"))
        if hit and os.environ.get("KILL_WHEN") == "before":
            os._exit(137)
        real(src, dst, *args, **kwargs)
        if hit and os.environ.get("KILL_WHEN") == "after":
            os._exit(137)
    return rename


def _counted(kind, real):
    def call(path, *args, **kwargs):
        _event(kind, path, kwargs.get("dir_fd"))
        return real(path, *args, **kwargs)
    return call


def _os_open(path, flags, *args, **kwargs):
    if flags & os.O_CREAT:
        _event("create", path, kwargs.get("dir_fd"))
    return _real["open"](path, flags, *args, **kwargs)


def _open(file, mode="r", *args, **kwargs):
    if _WRITING & set(mode):
        _event("create", file)
    return _real_open(file, mode, *args, **kwargs)


if os.environ.get("KILL_LOG") or os.environ.get("KILL_FILE") or _ROOT:
    os.replace = _by_rename(_real["replace"])
    os.rename = _by_rename(_real["rename"])
if _ROOT:
    os.mkdir = _counted("mkdir", _real["mkdir"])
    os.unlink = _counted("remove", _real["unlink"])
    os.remove = _counted("remove", _real["remove"])
    os.rmdir = _counted("remove", _real["rmdir"])
    os.open = _os_open
    builtins.open = _open
