"""`lors params table1`: the paper's Table 1 from real modules."""
import json

from lors.cli import main


def run_json(capsys, *argv):
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_table1_exact_counts(capsys):
    result = run_json(capsys, "params", "table1", "--json")
    for row in result["static"]:
        r = row["rank"]
        assert row["without_per_layer"] == 32768 * 256
        assert row["stack_total"] == 32768 * 256 + 6 * r * (32768 + 256)
    for row in result["adaptive"]:
        r = row["rank"]
        assert row["without_per_layer"] == 256 * 64 * 128
        assert row["stack_total"] == 256 * 64 * 128 + 6 * 2 * (256 * r * r + 64 * r + r * 128)


def test_table1_matches_the_paper_at_printed_precision(capsys):
    result = run_json(capsys, "params", "table1", "--json")
    cells = [(kind, row) for kind, rows in result.items() for row in rows]
    for kind, row in cells:
        ours = row["per_layer"] / 1e6
        paper = float(row["paper_per_layer"].rstrip("M"))
        if (kind, row["rank"]) == ("static", 32):
            # 2,454,869 per layer: the paper prints 2.46M (it rounds the shared 1.398M up to
            # 1.40M before adding the private part); see docs/results/core.md
            assert round(ours, 2) == 2.45 and abs(ours - paper) < 0.01
        else:
            assert round(ours, 2) == paper, (kind, row["rank"])
        assert abs(row["percent"] - row["paper_percent"]) <= 0.25, (kind, row["rank"])


def test_table1_text_output(capsys):
    assert main(["params", "table1"]) == 0
    out = capsys.readouterr().out
    assert "LORS^T" in out and "LORS^A" in out and "1.53M" in out
