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


class IntList(argparse.Action):
    """`nargs="+"` integers, space-separated (`--layer-map 0 2 4`); a comma-separated value
    (`0,2,4`, the old spelling) is read the same."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, [int(x) for value in values for x in str(value).split(",") if x.strip()])
        except ValueError:
            raise InputError(f"{option_string} {' '.join(map(str, values))}: expected integers, e.g. "
                             f"{option_string} 0 2 4") from None


def deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str, **kwargs) -> None:
    """Accept `old`, a former spelling of the flag `new`, hidden from --help; using it prints a
    one-line note. `kwargs` as `new`'s add_argument (dest, type, nargs, action class)."""
    base = kwargs.pop("action", None)

    class Alias(base or argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"note: {old} is deprecated; use {new}", file=sys.stderr)
            if base is None:
                setattr(namespace, self.dest, values)
            else:
                super().__call__(parser, namespace, values, option_string)

    parser.add_argument(old, action=Alias, help=argparse.SUPPRESS, **kwargs)
