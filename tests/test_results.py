"""The README's results section quotes committed results files verbatim (no hand-typed numbers)."""

import importlib.util
import re

from .conftest import ROOT

_spec = importlib.util.spec_from_file_location("refresh_readme", ROOT / "results" / "refresh_readme.py")
refresh = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(refresh)


def test_every_table_the_readme_quotes_is_the_committed_file_verbatim():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("<!-- results:start -->")[1].split("<!-- results:end -->")[0]
    quotes = [(m.group("path"), m.group("body")) for m in refresh.QUOTE.finditer(section)]
    assert quotes, "the results section quotes no results file"
    for rel, body in quotes:
        assert (ROOT / rel).exists(), f"{rel} is quoted in the README but not committed"
        assert body == refresh.table_body(rel), f"the README's copy of {rel} is stale: run python results/refresh_readme.py"
    for img in re.findall(r"\]\((results/[^)]+\.png)\)", section):
        assert (ROOT / img).exists(), f"the README shows {img}, which is not committed"


def test_every_quote_is_matched_alone_and_an_empty_one_is_filled(tmp_path):
    readme = (ROOT / "README.md").read_text()
    n_open, n_close = readme.count("<!-- quote: "), readme.count("<!-- /quote -->")
    assert n_open == n_close == len(refresh.QUOTE.findall(readme))
    # a freshly written empty quote followed by another quote: each gets its own file, nothing between
    # them is lost (the pattern once matched from the empty quote to the next quote's end)
    rel = "results/quick/table2/vortex.md"
    text = f"<!-- quote: {rel} -->\n<!-- /quote -->\n\nkeep me\n\n<!-- quote: {rel} -->\nSTALE BODY\n<!-- /quote -->\n"
    out = refresh.refresh(text)
    assert "keep me" in out and out.count(refresh.table_body(rel)) == 2 and "STALE BODY" not in out
