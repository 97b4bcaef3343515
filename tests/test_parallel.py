"""`suite --jobs N`'s job runner: results come back in order from other processes, a failing step names itself
and carries its traceback, a step still running when the caller fails is stopped, and bad --jobs is refused."""

from __future__ import annotations

import os
import time

import pytest

from training.parallel import Jobs


def test_jobs_return_their_results_in_order_from_other_processes():
    with Jobs(2, 1) as pool:
        results = pool.run_all([(f"step {i}", pow, (2, i)) for i in range(5)])
        pids = pool.run_all([(f"pid {i}", os.getpid, ()) for i in range(2)])
    assert results == [1, 2, 4, 8, 16]
    assert os.getpid() not in pids


def test_a_failing_step_is_named_with_its_traceback():
    with Jobs(2, 1) as pool, pytest.raises(RuntimeError) as failed:
        pool.start("LoRAs, set 2", int, "not a number").result()
    assert "suite step 'LoRAs, set 2' failed" in str(failed.value)
    assert "ValueError: invalid literal for int()" in str(failed.value)


def test_a_step_still_running_when_the_caller_fails_is_stopped():
    with pytest.raises(KeyError), Jobs(2, 1) as pool:
        job = pool.start("single-stage ablation", time.sleep, 600)
        raise KeyError("the caller fails")
    assert not job.process.is_alive() and job.process.exitcode != 0


def test_one_job_runs_in_the_callers_process_and_zero_is_refused():
    assert Jobs(1, 1).run_all([("pid", os.getpid, ())]) == [os.getpid()]
    # a pool of 2 whose other slot is taken (the Stage-II members while the ablation runs) or with a single step
    # runs them here, one after the other
    assert Jobs(2, 1).run_all([(f"pid {i}", os.getpid, ()) for i in range(2)], at_once=1) == [os.getpid()] * 2
    assert Jobs(2, 1).run_all([("pid", os.getpid, ())]) == [os.getpid()]
    with pytest.raises(SystemExit, match="--jobs is 0"):
        Jobs(0, 1)
