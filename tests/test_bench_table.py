"""`hybridps bench table` on tiny sizes: output files and JSON schema (no speed assertions)."""
import argparse
import json
import math

import pytest

pytest.importorskip("pandas")
pytest.importorskip("matplotlib")

from hybridps.bench.table import add_arguments, run_table_bench  # noqa: E402

SIZES = (1000, 5000)


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_table")
    result = run_table_bench(out, sizes=SIZES, repeats=1)
    return out, result


def test_json_schema_and_values(bench_dir):
    out, result = bench_dir
    on_disk = json.loads((out / "table.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    cases = on_disk["cases"]
    assert [(c["keys"], c["op"]) for c in cases] == [(n, op) for n in SIZES for op in ("lookup", "insert")]
    for case in cases:
        for name in ("hybridps", "pandas", "dict"):
            mops = case[f"{name}_mops"]
            assert isinstance(mops, float) and math.isfinite(mops) and mops >= 0     # measured: no speed asserted
    machine = on_disk["machine"]
    assert machine["cpu_count"] >= 1 and machine["numpy"] and machine["pandas"] and machine["python"]


def test_markdown_and_chart(bench_dir):
    out, _ = bench_dir
    md = (out / "table.md").read_text()
    assert "hybridps/pandas" in md and "Targets" in md
    for n in SIZES:
        for op in ("lookup", "insert"):
            assert f"| {op} | {n:,} |" in md
    png = (out / "table.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000


def test_cli_arguments():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--out", "x", "--sizes", "1000,1e6", "--repeats", "2"])
    assert (args.out, args.sizes, args.repeats, args.seed) == ("x", [1000, 1_000_000], 2, 0)
    assert parser.parse_args(["--out", "x"]).sizes == [10_000, 1_000_000, 4_000_000]
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "x", "--sizes", "10,abc"])
