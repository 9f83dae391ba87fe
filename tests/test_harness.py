"""The suite's own guarantees: a native crash fails one test and the run goes on; a rank's native crash is retried
only at start-up (before its first forward), with a warning."""
import subprocess
import sys
import textwrap

import pytest
import torch.multiprocessing as mp

from conftest import REPO, spawn_two_ranks
from dist_workers import crash_after_forward, crash_once_at_start_up


def test_a_segfault_fails_one_test_and_the_run_goes_on(tmp_path):
    """The README's test command runs tests in an xdist worker: a test that kills its process (torch's MemTracker
    once did) is reported failed and the tests after it still run."""
    (tmp_path / "test_crash.py").write_text(textwrap.dedent("""
        import os, signal

        def test_crashes():
            os.kill(os.getpid(), signal.SIGSEGV)

        def test_after_the_crash():
            assert True
    """))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "1",
                        "--max-worker-restart=4", str(tmp_path / "test_crash.py")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert "1 failed, 1 passed" in r.stdout, r.stdout[-2000:]
    assert "crashed while running" in r.stdout and "test_crashes" in r.stdout
    assert r.returncode == 1


def test_makefile_runs_the_suite_in_crash_isolating_workers():
    """The suite runs in xdist workers that are replaced when one crashes (the case the test above checks)."""
    import re

    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"pytest .*-n \$\(TEST_WORKERS\) .*--max-worker-restart=\d+", makefile), makefile


@pytest.mark.timeout(180)
def test_a_native_crash_after_the_first_forward_is_not_retried():
    with pytest.raises(mp.ProcessExitedException, match="after its first forward: a crash in training, not retried"):
        spawn_two_ranks(crash_after_forward, 1)


@pytest.mark.timeout(180)
def test_a_start_up_crash_is_retried_once_and_says_so(tmp_path):
    flag = tmp_path / "crashed-once"
    with pytest.warns(UserWarning, match=r"rank 1 died with SIGABRT before its first forward .*retried once"):
        spawn_two_ranks(crash_once_at_start_up, str(flag))
    assert flag.exists()
