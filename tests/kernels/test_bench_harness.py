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
