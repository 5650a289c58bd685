"""The one exception type for bad input, and the CLI pieces that turn it into one line and exit code 2."""
import argparse
import functools
import sys


class InputError(ValueError):
    """Bad user input: a file that is missing, malformed or inconsistent.

    The message is one line that names the file (or flag) and what is wrong with it.
    Command-line entry points print it and exit with code 2.
    """


def cli_main(main):
    """Decorate a CLI `main(argv=None)`: an InputError becomes one line on stderr and exit 2."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2)

    return wrapper


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit 2 like every other bad input."""

    def error(self, message):
        raise InputError(f"{message} (see --help)")
