"""Typed library errors -> one line on stderr that names the flag or file to change, and the exit code:
2 for a usage error (a flag's value or a combination of flags: errors.ConfigError, as argparse's own
errors), 1 for a failure at run time (a missing or damaged file, the data, storage, a diverged run)."""
import sys

from micronet_cifar100 import errors

# Settings whose flag is not `--` + the setting with dashes.
_FLAGS = {"data_dir": "--data_dir"}

# What to do about each kind of error, in the scripts' terms (the libraries do not know the flags).
_HINTS = (
    (errors.DataNotFound, "pass --data_dir to a folder containing cifar-100-python/, or drop "
                          "--no-download to fetch it"),
    (errors.DownloadFailed, "connect to the internet, or pass --data_dir to a folder containing "
                            "cifar-100-python/ and add --no-download"),
    (errors.ArchitectureMismatch, "pass the matching --model/--width-mult/--depth-mult/--coslinear"),
)

TEACHER_HINT = ("pass the teacher's matching --label-refinery-model/--label-refinery-width-mult/"
                "--label-refinery-depth-mult/--label-refinery-coslinear")

# A StorageError's advice follows its cause: a full disk is freed, a folder one cannot write is changed.
_STORAGE_HINTS = {
    "full": "free disk space or inodes, or choose another --save folder, then run the same command with "
            "--resume auto",
    "denied": "fix the permissions, or choose a folder this user can write",
    "read-only": "the file system is mounted read-only: choose a writable folder",
}


def flag(setting):
    """The command-line flag of a setting name (argparse's dest)."""
    return _FLAGS.get(setting, "--" + setting.replace("_", "-"))


def message(e):
    """The one-line text for a ToolkitError: the flag it is about, the problem, what to do."""
    text = str(e)
    if getattr(e, "setting", None):
        text = f"{flag(e.setting)}: {text}"
    hint = _STORAGE_HINTS.get(e.cause) if isinstance(e, errors.StorageError) else None
    if isinstance(e, errors.ArchitectureMismatch) and (e.setting or "").startswith("label_refinery"):
        hint = TEACHER_HINT   # the teacher's file: its own flags, not the student's
    hint = hint or next((h for cls, h in _HINTS if isinstance(e, cls)), None)
    if hint:
        text = f"{text}; {hint}"
    return " ".join(text.split())


USAGE, FAILURE = 2, 1


def exit_code(e):
    """2 for a usage error, 1 for a failure at run time."""
    return USAGE if isinstance(e, errors.ConfigError) else FAILURE


def run_main(main, argv=None):
    """Run a script's main; a ToolkitError becomes one line on stderr and its exit code."""
    try:
        return main(argv)
    except errors.ToolkitError as e:
        print(f"error: {message(e)}", file=sys.stderr)
        sys.exit(exit_code(e))
