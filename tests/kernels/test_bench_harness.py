import csv

import torch

from bench.harness import markdown_rows, measure_round_robin, write_csv


def test_round_robin_times_and_peak_memory(tmp_path):
    calls = {
        "allocates_256_mib": lambda: torch.ones(64 * 2**20).sum(),  # 64 Mi fp32 = 256 MiB
        "allocates_nothing": lambda: None,
    }
    order = []
    results = measure_round_robin(calls, device="cpu", warmup=1, repeats=2, after_each=order.append)
    assert order == list(calls) * 3  # interleaved, warmup included
    assert all(len(result.seconds) == 2 for result in results.values())
    assert 250 <= results["allocates_256_mib"].peak_mib < 300
    assert results["allocates_nothing"].peak_mib < 16

    rows = [{"method": name, "peak_mib": round(result.peak_mib)} for name, result in results.items()]
    path = tmp_path / "out.csv"
    write_csv(path, rows)
    write_csv(path, rows)  # appends without a second header
    with path.open() as handle:
        assert [row["method"] for row in csv.DictReader(handle)] == list(calls) * 2
    assert markdown_rows(rows, ["method"], header=True).splitlines()[2] == "| allocates_256_mib |"


def test_write_csv_widens_the_file_when_a_benchmark_gains_a_column(tmp_path):
    path = tmp_path / "out.csv"
    write_csv(path, [{"method": "a", "s": 1.0}])
    write_csv(path, [{"method": "b", "s": 2.0, "gflop": 9.5}])
    write_csv(path, [{"method": "c", "s": 3.0, "gflop": 7.0}])
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["method"], r["s"], r["gflop"]) for r in rows] == [("a", "1.0", ""), ("b", "2.0", "9.5"),
                                                                  ("c", "3.0", "7.0")]
