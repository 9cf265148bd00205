"""Tests for pman: real processes, real files, real sockets."""
import json
import os
import subprocess
import sys
import threading
import time

import pytest

import pman


@pytest.fixture
def mgr(tmp_path):
    m = pman.JobManager(str(tmp_path / "state"))
    yield m
    m.close(kill=True)


def test_smoke_run_wait(mgr):
    job = mgr.run("echo hi; exit 3", jid="a")
    json.dumps(job)
    done = mgr.wait("a", timeout=10)
    assert done["returncode"] == 3 and done["status"] == "finishedWithError"
    assert mgr.read_log("a")["data"] == b"hi\n"
