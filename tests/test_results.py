"""results/README.md quotes the published tables verbatim and the README's headline table is computed
from them (no hand-typed numbers), and cheap committed jobs still come out of today's code with the
published numbers."""

import importlib.util
import re

import numpy as np
import pytest

from harness import data, registry
from harness.protocol import PopbenchError
from harness.store import RunStore

from .conftest import ROOT, run_cli

_spec = importlib.util.spec_from_file_location("refresh_readme", ROOT / "results" / "refresh_readme.py")
refresh = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(refresh)


def test_every_table_results_readme_quotes_is_the_committed_file_verbatim():
    text = refresh.RESULTS_README.read_text()
    quotes = [(m.group("path"), m.group("body")) for m in refresh.QUOTE.finditer(text)]
    assert quotes, "results/README.md quotes no results file"
    for rel, body in quotes:
        assert (ROOT / rel).exists(), f"{rel} is quoted in results/README.md but not committed"
        assert body == refresh.table_body(rel), f"results/README.md's copy of {rel} is stale: run python results/refresh_readme.py"
    published = {p.relative_to(ROOT).as_posix() for p in (ROOT / "results").glob("*/table*/*.md")}
    assert published <= {rel for rel, _ in quotes}, f"published but not in results/README.md: {sorted(published - {rel for rel, _ in quotes})}"
    for img in re.findall(r"\]\(([^)]+\.png)\)", text):
        assert (refresh.RESULTS_README.parent / img).exists(), f"results/README.md shows {img}, which is not committed"


def test_the_readme_headline_is_computed_from_the_published_tables():
    readme = refresh.README.read_text()
    m = refresh.HEADLINE.search(readme)
    assert m, "the README has no headline table between its markers"
    assert m.group("body") == refresh.headline(), "the README's headline table is stale: run python results/refresh_readme.py"
    # every number in it is a cell of a published aggregate CSV, or the paper's
    body = m.group("body")
    assert "GF-SDE paired, Forecast W1" in body and "Boids, Forecast W1" in body
    assert refresh.main(["--check"]) == 0


def test_every_quote_is_matched_alone_and_an_empty_one_is_filled(tmp_path):
    text = refresh.RESULTS_README.read_text()
    n_open, n_close = text.count("<!-- quote: "), text.count("<!-- /quote -->")
    assert n_open == n_close == len(refresh.QUOTE.findall(text))
    # a freshly written empty quote followed by another quote: each gets its own file, nothing between
    # them is lost (the pattern once matched from the empty quote to the next quote's end)
    rel = "results/quick/table2/vortex.md"
    text = f"<!-- quote: {rel} -->\n<!-- /quote -->\n\nkeep me\n\n<!-- quote: {rel} -->\nSTALE BODY\n<!-- /quote -->\n"
    out = refresh.refresh(text)
    assert "keep me" in out and out.count(refresh.table_body(rel)) == 2 and "STALE BODY" not in out


def test_the_user_facing_docs_name_no_internal_history_and_no_path_outside_the_project():
    """README, docs/ and results/README.md speak of the project only."""
    pages = [ROOT / "README.md", refresh.RESULTS_README, *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        text = page.read_text()
        for pattern in (r"\.\./shared", r"shared/spec", r"\bthis (CPU|session|machine)\b", r"\b[Ii]ssue #?\d",
                        r"\b(two|three|four|a later|the next|previous) sessions?\b", r"session's end"):
            found = re.search(pattern, text)
            assert not found, f"{page.relative_to(ROOT)} says {found.group(0)!r}: internal history, or a path users lack"
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250, "the README is for a 5-minute read: at most 250 lines"
    for link in re.findall(r"\]\(((?:docs|results)/[^)#]+)\)", (ROOT / "README.md").read_text()):
        assert (ROOT / link).exists(), f"the README links to {link}, which does not exist"


# Cheap committed quick-profile jobs, rerun by today's code: a published number that the code no longer
# produces (a changed default, generator or metric) fails here, not in a user's rerun. One per table;
# seed 0; each under a minute on the 2-core CI machine. Expensive jobs (WLM) are checked by hand.
REPRODUCED = [
    ("table1", "gf_sde/quadratic-paired", "jkonet_star"),
    ("table2", "vortex/interpolation", "am"),
    ("table2", "vortex/forecast", "static"),
    ("table3", "eb300/holdout-1", "am"),
    ("table4", "boids/unseen-init", "static"),
]


@pytest.mark.parametrize("table,task,method", REPRODUCED, ids=[f"{t}-{m}" for t, _, m in REPRODUCED])
def test_committed_quick_rows_reproduce(tmp_path, table, task, method):
    pd = pytest.importorskip("pandas")
    family, variant = task.split("/")
    for name in registry.tasks.load(family).variant_data_files(variant):
        try:
            data.resolve(name, download=False)
        except PopbenchError as exc:
            pytest.skip(str(exc))
    committed = pd.read_csv(ROOT / "results" / "quick" / table / "rows_long.csv")
    committed = committed[(committed.task == family) & (committed.variant == variant) & (committed.method == method)
                          & (committed.seed == 0) & committed.w1.notna()]
    assert len(committed), f"results/quick/{table} has no scored rows for {method} on {task}, seed 0"
    out = tmp_path / "run"
    r = run_cli("--tasks", task, "--methods", method, "--profile", "quick", "--seeds", "0", "--out", str(out),
                "--no-progress")
    assert r.returncode == 0, r.stderr
    ours = pd.DataFrame([row for row in RunStore(out).read_rows()
                         if row.get("row_type") == "target" and row["w1"] is not None])
    assert set(ours.hparams_hash) == set(committed.hparams_hash), \
        f"{method}'s quick settings changed since results/quick/{table} was published: republish it"
    key = ["query", "t"]
    merged = committed.merge(ours, on=key, how="outer", suffixes=("_committed", "_now"), indicator=True)
    assert (merged._merge == "both").all(), merged.loc[merged._merge != "both", key + ["_merge"]]
    np.testing.assert_allclose(merged.w1_now, merged.w1_committed, rtol=1e-6, atol=1e-9)


PUBLISHED = sorted(p.parent.relative_to(ROOT).as_posix() for profile in ("smoke", "quick", "paper")
                   for p in (ROOT / "results" / profile).glob("*/jobs.csv"))


@pytest.mark.parametrize("published", PUBLISHED)
def test_a_committed_publication_restores_and_republishes_to_the_same_tables(published, capsys):
    """Its bundle (what `restore` carries to a new run) holds exactly the rows its tables were made
    from: restored into a scratch run and republished, every table and CSV comes back byte-identical."""
    if not (ROOT / published / "rows.jsonl.gz").exists():
        pytest.fail(f"{published} has no rows.jsonl.gz: republish it, or rebuild it with results/rebuild_bundle.py")
    spec = importlib.util.spec_from_file_location("rebuild_bundle", ROOT / "results" / "rebuild_bundle.py")
    rebuild = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rebuild)
    assert rebuild.check(ROOT / published, None), capsys.readouterr().out


def test_compare_tables_finds_each_moved_cell_in_units_of_se(tmp_path, capsys):
    """results/compare_tables.py: a publication against itself is all equal (exit 0); a copy with one
    cell moved by half its SE and one cell dropped is reported cell by cell, and --max-se fails it."""
    pd = pytest.importorskip("pandas")
    spec = importlib.util.spec_from_file_location("compare_tables", ROOT / "results" / "compare_tables.py")
    compare_tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare_tables)
    pub = ROOT / "results" / "quick" / "table2"
    assert compare_tables.main([str(pub), str(pub), "--max-se", "0"]) == 0
    table = pd.read_csv(pub / "vortex_aggregate.csv")
    n = int(table["variant"].isna().sum())
    assert f"{n} cells in both (vortex_aggregate.csv); {n} equal" in capsys.readouterr().out
    row = table.index[(table.method == "am") & (table.key == "w1_holdout_5")][0]
    se = table.loc[row, "se"]
    table.loc[row, "mean"] += 0.5 * se
    (tmp_path / "moved").mkdir()
    table.to_csv(tmp_path / "moved" / "vortex_aggregate.csv", index=False)
    assert compare_tables.main([str(pub), str(tmp_path / "moved"), "--max-se", "0.4"]) == 1
    assert compare_tables.main([str(pub), str(tmp_path / "moved"), "--max-se", "0.6"]) == 0
    table = table.drop(table.index[(table.method == "dice") & (table.key == "train_w1")])
    table.to_csv(tmp_path / "vortex_aggregate.csv", index=False)
    m = compare_tables.compare(pub, tmp_path)
    moved = m[(m["side"] == "both") & (m["diff"] > 1e-9)]
    assert list(zip(moved.method, moved.key)) == [("am", "w1_holdout_5")]
    assert moved.diff_se.iloc[0] == pytest.approx(0.5)
    assert list(zip(m[m.side == "left_only"].method, m[m.side == "left_only"].key)) == [("dice", "train_w1")]
    assert compare_tables.main([str(pub), str(tmp_path), "--max-se", "1"]) == 1  # a cell is missing
    assert compare_tables.main([str(pub), str(tmp_path)]) == 0
