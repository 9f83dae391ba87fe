"""The fault-injection suite (tests/fault_injection.py) through the real CLI: every fault ends, after the resume a
user or SLURM's requeue would do, with the adapters of an uninterrupted run; the tally is printed either way."""
import pytest

from fault_injection import run_suite, tally

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_no_fault_loses_a_run(tmp_path, capsys):
    results = run_suite(tmp_path)
    with capsys.disabled():
        print("\n" + tally(results))
    assert len(results) == 10
    assert [r["fault"] for r in results if r["lost"]] == []
