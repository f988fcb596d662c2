"""The README and docs/: the results table and the GPU records page are what the committed records
generate, every relative link names a file that exists, and the README keeps its two commands."""
import re
from pathlib import Path

from bench.gpu_record import README_END, README_START, RESULTS, gpu_records_page, records_in, results_table

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]


def test_readme_results_table_is_generated_from_the_records():
    text = (REPO / "README.md").read_text()
    block = text[text.index(README_START) + len(README_START):text.index(README_END)].strip()
    records = records_in(RESULTS)
    assert block == results_table(records, "bench/results/"), "run: python -m bench.gpu_record readme"
    assert (REPO / "docs" / "gpu-records.md").read_text() == gpu_records_page(records)
    trained = [r for _, r in records if r["train"]]
    assert len(block.splitlines()) == 2 + len(trained)  # a row per recorded training run


def test_results_table_rows_from_records(tmp_path):
    """Built independently of the committed records: a finished run, a stopped one, a seed group."""
    def record(preset, status="finished", seeds=None):
        train = {"preset": preset, "status": status, "epochs_done": 30 if status != "finished" else 50,
                 "epochs_planned": 50, "switches": {"compile": "default", "whole_step": "one CUDA graph per step"},
                 "config": {"data_placement": "device"}, "mean_epoch_train_s": 3.104, "train_s_total": 155.4,
                 "eval_s_total": 3.0, "final_test_acc": 0.9007}
        if seeds:
            train.update(seeds=seeds, pack=3, wall_s=200.0, final_test_acc_std=0.0012)
        return {"date": "2026-12-04", "gpu": "G", "torch": "2.11", "train": train, "benchmarks": []}

    rows = results_table([("a.json", record("paper")), ("b.json", record("tuned", "interrupted")),
                          ("c.json", record("paper", seeds=[{}, {}, {}])),
                          ("d.json", {"date": "2026-12-04", "gpu": "G", "torch": "2.11", "train": None})],
                         "x/").splitlines()
    assert rows[2] == "| G | paper | default + whole step + resident data | 3.10 | 155 | 90.07% | [2026-12-04](x/a.md) |"
    assert rows[3].startswith("| G | tuned (30/50 epochs) |")
    assert "| paper, 3 seeds |" in rows[4] and "| 90.07 ± 0.12% |" in rows[4]
    assert len(rows) == 5  # the benchmarks-only record has no training row


def anchors(page: Path) -> set[str]:
    """The #anchors of a page's headings, as GitHub makes them."""
    heads = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_every_relative_link_resolves():
    missing = []
    for page in PAGES:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)]*))?\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            linked = (page.parent / target) if target else page
            if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
                missing.append(f"{page.relative_to(REPO)} -> {target}#{anchor}")
    assert not missing, missing


def test_readme_has_the_two_commands_and_stays_short():
    text = (REPO / "README.md").read_text()
    assert "bash scripts/install.sh && .venv/bin/fastres train" in text
    assert ".venv/bin/python -m pytest -n 2 --dist worksteal" in text
    assert "pytest -n 2 --dist worksteal" in (REPO / ".ci" / "run").read_text()
    assert len(text.splitlines()) <= 250
