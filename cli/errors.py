"""Typed library errors -> one line on stderr that names the flag or file to change, exit code 2."""
import sys

import errors

# Settings whose flag is not `--` + the setting with dashes.
_FLAGS = {"data_dir": "--data_dir"}

# What to do about each kind of error, in the scripts' terms (the libraries do not know the flags).
_HINTS = (
    (errors.DataNotFound, "pass --data_dir to a folder containing cifar-100-python/, or drop "
                          "--no-download to fetch it"),
    (errors.DownloadFailed, "connect to the internet, or pass --data_dir to a folder containing "
                            "cifar-100-python/ and add --no-download"),
    (errors.ArchitectureMismatch, "pass the matching --model/--width-mult/--depth-mult/--coslinear"),
    (errors.StorageError, "free disk space or inodes, or choose another --save folder, then run the "
                          "same command with --resume auto"),
)


def flag(setting):
    """The command-line flag of a setting name (argparse's dest)."""
    return _FLAGS.get(setting, "--" + setting.replace("_", "-"))


def message(e):
    """The one-line text for a ToolkitError: the flag it is about, the problem, what to do."""
    text = str(e)
    if getattr(e, "setting", None):
        text = f"{flag(e.setting)}: {text}"
    for cls, hint in _HINTS:
        if isinstance(e, cls):
            text = f"{text}; {hint}"
            break
    return " ".join(text.split())


def run_main(main, argv=None):
    """Run a script's main; a ToolkitError becomes one line on stderr and exit code 2."""
    try:
        return main(argv)
    except errors.ToolkitError as e:
        print(f"error: {message(e)}", file=sys.stderr)
        sys.exit(2)
