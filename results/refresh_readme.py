"""Refresh the tables the README quotes from committed results files.

The README's results section quotes each table between ``<!-- quote: results/...md -->`` and
``<!-- /quote -->``; after `run_all.py publish` rewrites a table, run ``python results/refresh_readme.py``
so the README shows exactly the committed numbers (tests/test_results.py checks that it does).
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the body never contains "<!--", so a quote cannot swallow the text up to the next quote's end
# (an empty quote, freshly written, used to do just that); it may be empty
QUOTE = re.compile(r"(<!-- quote: (?P<path>[^ ]+) -->\n)(?P<body>(?:(?!<!--).)*?)\n?(<!-- /quote -->)", re.S)


def table_body(rel: str) -> str:
    """The file without its first line (the ``**family**`` heading)."""
    return (ROOT / rel).read_text().strip().split("\n", 1)[1].strip()


def refresh(text: str) -> str:
    """``text`` with every quote's body replaced by the current file's."""
    return QUOTE.sub(lambda m: m.group(1) + table_body(m.group("path")) + "\n" + m.group(4), text)


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    new = refresh(text)
    readme.write_text(new)
    print(f"{len(QUOTE.findall(text))} quoted tables, {'updated' if new != text else 'already current'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
