"""One-line user errors: raised anywhere, printed by the scripts as `error: ...` with exit code 2."""
import sys


class UserError(Exception):
    """A problem with the user's input (flag, file, folder, data); the message names the fix."""


def run_main(main, argv=None):
    """Run a script's main; a UserError becomes one line on stderr and exit code 2, no traceback."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
