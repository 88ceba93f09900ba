"""A simulated SIGKILL at one rename, for any script run with PYTHONPATH=tests/killer (Python imports
this sitecustomize module at start-up).

Environment: KILL_LOG=PATH appends every renamed destination's basename (one a line) and kills
nothing; KILL_FILE=NAME, KILL_NTH=N (1-based) and KILL_WHEN=before|after kill the process with
os._exit(137) just before or just after the N-th rename onto a file called NAME. os._exit skips
every `finally` and atexit handler, as a real SIGKILL does: temporaries stay, the kernel drops the
locks. Only used by tests/test_crash.py.
"""
import os

_real_replace = os.replace
_seen = {}


def _replace(src, dst, *args, **kwargs):
    name = os.path.basename(os.fspath(dst))
    if os.environ.get("KILL_LOG"):
        with open(os.environ["KILL_LOG"], "a") as f:
            f.write(name + "\n")
    _seen[name] = _seen.get(name, 0) + 1
    hit = name == os.environ.get("KILL_FILE") and _seen[name] == int(os.environ.get("KILL_NTH", "0"))
    if hit and os.environ.get("KILL_WHEN") == "before":
        os._exit(137)
    _real_replace(src, dst, *args, **kwargs)
    if hit and os.environ.get("KILL_WHEN") == "after":
        os._exit(137)


if os.environ.get("KILL_LOG") or os.environ.get("KILL_FILE"):
    os.replace = _replace
