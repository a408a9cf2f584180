"""The README's results section quotes committed results files verbatim (no hand-typed numbers)."""

import re

from .conftest import ROOT

QUOTE = re.compile(r"<!-- quote: (?P<path>[^ ]+) -->\n(?P<body>.*?)\n<!-- /quote -->", re.S)


def test_every_table_the_readme_quotes_is_the_committed_file_verbatim():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("<!-- results:start -->")[1].split("<!-- results:end -->")[0]
    quotes = QUOTE.findall(section)
    assert quotes, "the results section quotes no results file"
    for rel, body in quotes:
        path = ROOT / rel
        assert path.exists(), f"{rel} is quoted in the README but not committed"
        committed = path.read_text().strip().split("\n", 1)[1].strip()
        assert body == committed, f"the README's copy of {rel} is stale: run python results/refresh_readme.py"
    for img in re.findall(r"\]\((results/[^)]+\.png)\)", section):
        assert (ROOT / img).exists(), f"the README shows {img}, which is not committed"
