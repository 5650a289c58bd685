"""`python -m xlmr_mini`: the commands, each run as `python -m xlmr_mini.COMMAND --help`."""
import ast
from pathlib import Path

import xlmr_mini
import xlmr_mini.data

PACKAGE = Path(__file__).resolve().parent


def commands() -> dict[str, str]:
    """command -> the first line of its docstring: every module of the package that runs as a
    script, and the `data` package (its own `__main__`)."""
    found = {}
    for path in sorted(PACKAGE.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        if path.stem != "__main__" and 'if __name__ == "__main__":' in text:
            found[path.stem] = _summary(text)
    data = Path(xlmr_mini.data.__file__).resolve().parent / "__main__.py"
    found["data"] = _summary(data.read_text(encoding="utf-8"))
    return dict(sorted(found.items()))


def _summary(source: str) -> str:
    first = (ast.get_docstring(ast.parse(source)) or "-").strip().splitlines()[0].replace("`", "")
    # The listing gives the usage: drop a docstring's own "python -m xlmr_mini.X ...".
    first = first.split(": ", 1)[1] if first.startswith("python -m") else first.split(": python -m")[0].rstrip(".") + "."
    return first[:1].upper() + first[1:]


def main() -> None:
    print(f"xlmr_mini {xlmr_mini.__version__}: distil multilingual XLM-R classifiers into smaller students.\n")
    print("Commands (python -m xlmr_mini.COMMAND --help for each one's flags):")
    listed = commands()
    width = max(map(len, listed))
    for name, summary in listed.items():
        print(f"  {name:<{width}}  {summary}")


if __name__ == "__main__":
    main()
