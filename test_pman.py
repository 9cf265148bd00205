"""Tests for pman: real child processes, real files, a real server on a real
socket.  No mocks of subprocess, os or the network; every wait is bounded by
a deadline.  Run: python3 -m pytest -q test_pman.py
"""
import fcntl
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
# Child Python processes started by the tests import this checkout's pman.
os.environ["PYTHONPATH"] = HERE + (os.pathsep + os.environ["PYTHONPATH"]
                                   if os.environ.get("PYTHONPATH") else "")

import pman  # noqa: E402


# ===========================================================================
# core
# ===========================================================================
# ---------------------------------------------------------------------------
# helpers and fixtures
# ---------------------------------------------------------------------------

_CORE_STATUSES = {"notstarted", "started", "finishedSuccessfully",
                  "finishedWithError", "undefined"}


def _core_until(pred, timeout=10.0, what="condition", interval=0.01):
    """Poll *pred* until it returns a truthy value or *timeout* s pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %s s waiting for %s" % (timeout, what))
        time.sleep(interval)


def _core_proc_stat(pid):
    """(state, ppid, pgrp, comm) of *pid* or None."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
    except OSError:
        return None
    comm = data[data.find(b"(") + 1:data.rfind(b")")].decode("utf-8", "replace")
    fields = data[data.rfind(b")") + 2:].split()
    return fields[0].decode(), int(fields[1]), int(fields[2]), comm


def _core_group(pgid):
    """[(pid, state, comm)] of every process whose process group is *pgid*."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = _core_proc_stat(int(name))
        if st is not None and st[2] == pgid:
            out.append((int(name), st[0], st[3]))
    return out


def _core_live(pgid):
    return [p for p in _core_group(pgid) if p[1] != "Z"]


def _core_alive(pid):
    st = _core_proc_stat(pid)
    return st is not None and st[0] != "Z"


def _core_wait_running(pid, timeout=10):
    """Wait until the job whose wrapper is *pid* runs its own command (a live
    process in its group that is not one of the wrapper shells)."""
    return _core_until(lambda: [p for p in _core_live(pid) if p[2] != "sh"], timeout,
                       "the job's command to run")


def _core_stamp(value):
    assert isinstance(value, str) and value.endswith("+00:00"), value
    parsed = datetime.fromisoformat(value)
    assert parsed.utcoffset() == timedelta(0)
    return parsed


def _core_mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def core_make(tmp_path):
    """Factory of managers (default dir: tmp_path/state); all closed with
    kill=True at teardown."""
    made = []

    def make(path=None, **options):
        m = pman.JobManager(str(path if path is not None else tmp_path / "state"), **options)
        made.append(m)
        return m

    yield make
    for m in reversed(made):
        m.close(kill=True)


@pytest.fixture
def core_mgr(core_make):
    return core_make()


# ---------------------------------------------------------------------------
# the one-line call, default state dir, modes, record shape
# ---------------------------------------------------------------------------

def test_core_one_line_call_twice(tmp_path, monkeypatch):
    state = tmp_path / "pman-env-state"
    monkeypatch.setenv("PMAN_STATE_DIR", str(state))
    have_cal = shutil.which("cal") is not None
    first = pman.JobManager().run("cal 7 1970", jid="123")
    m = pman.JobManager()
    try:
        assert m.state_dir == os.path.realpath(str(state))
        assert pman.JobManager() is m            # same dir, same process: same object
        assert first["jid"] == "123" and first["cmd"] == "cal 7 1970"
        assert first["status"] == "started" and first["returncode"] is None
        done1 = pman.JobManager().wait("123", timeout=10)
        assert done1["status"] in ("finishedSuccessfully", "finishedWithError")
        out1 = m.read_log("123")["data"]
        err1 = m.read_log("123", "stderr")["data"]
        if have_cal:
            assert done1["returncode"] == 0, done1
            assert b"July 1970" in out1
        # second run of the finished jid replaces the record
        second = pman.JobManager().run("cal 7 1970", jid="123")
        assert second["status"] == "started"
        assert second["seq"] > done1["seq"]
        assert second["returncode"] is None and second["ended"] is None
        done2 = m.wait("123", timeout=10)
        assert done2["returncode"] == done1["returncode"]
        assert [j["jid"] for j in m.jobs()] == ["123"]
        assert sum(m.counts().values()) == 1
        # logs were replaced, not appended to
        assert m.read_log("123")["data"] == out1
        assert m.read_log("123", "stderr")["data"] == err1
        if have_cal:
            assert m.read_log("123")["data"].count(b"July 1970") == 1
    finally:
        m.close(kill=True)


def test_core_default_state_dir_resolution_and_modes(tmp_path, monkeypatch):
    pdir = tmp_path / "explicit"
    xdg = tmp_path / "xdg"
    home = tmp_path / "home"
    for d in (xdg, home):
        d.mkdir()
    # a pre-existing, too-open directory is tightened to 0700
    (xdg / "pman").mkdir(mode=0o755)
    os.chmod(xdg / "pman", 0o755)
    old_umask = os.umask(0)       # so that only pman's own modes protect files
    try:
        monkeypatch.setenv("PMAN_STATE_DIR", str(pdir))
        monkeypatch.setenv("XDG_STATE_HOME", str(xdg))
        monkeypatch.setenv("HOME", str(home))
        expected = [str(pdir), str(xdg / "pman"), str(home / ".local" / "state" / "pman")]
        for step, want in enumerate(expected):
            if step == 1:
                monkeypatch.delenv("PMAN_STATE_DIR")
            if step == 2:
                monkeypatch.setenv("PMAN_STATE_DIR", "")     # empty counts as unset
                monkeypatch.delenv("XDG_STATE_HOME")
            m = pman.JobManager()
            try:
                assert m.state_dir == os.path.realpath(want)
                assert _core_mode(want) == 0o700
                job = m.run("echo out; echo err >&2", jid="modes")
                m.wait(job["jid"], timeout=10)
                assert job["stdout"] == os.path.join(os.path.realpath(want), "logs", "modes.out")
                assert job["stderr"] == os.path.join(os.path.realpath(want), "logs", "modes.err")
                assert _core_mode(job["stdout"]) == 0o600
                assert _core_mode(job["stderr"]) == 0o600
                m.flush()
                for name in os.listdir(want):
                    path = os.path.join(want, name)
                    assert _core_mode(path) & 0o077 == 0, (name, oct(_core_mode(path)))
            finally:
                m.close(kill=True)
    finally:
        os.umask(old_umask)
    assert (pdir / "logs" / "modes.out").read_bytes() == b"out\n"
    assert (xdg / "pman" / "logs" / "modes.out").read_bytes() == b"out\n"
    assert (home / ".local" / "state" / "pman" / "logs" / "modes.err").read_bytes() == b"err\n"


def test_core_record_shape_json_and_timestamps(core_mgr):
    sub = core_mgr.run("echo hello; exit 2", jid="rec", auid="alice",
                       meta={"k": [1, 2], "s": "x"})
    json.dumps(sub)
    rec = core_mgr.wait("rec", timeout=10)
    text = json.dumps(rec)
    assert json.loads(text) == rec
    for key in ("jid", "cmd", "auid", "meta", "status", "message", "returncode", "pid",
                "submitted", "started", "ended", "stdout", "stderr"):
        assert key in rec, key
    assert rec["jid"] == "rec" and rec["cmd"] == "echo hello; exit 2"
    assert rec["auid"] == "alice" and rec["meta"] == {"k": [1, 2], "s": "x"}
    assert rec["status"] == "finishedWithError" and rec["returncode"] == 2
    assert rec["message"] == "exited with code 2"
    assert isinstance(rec["pid"], int) and rec["pid"] == sub["pid"] > 0
    t_sub, t_start, t_end = (_core_stamp(rec[k]) for k in ("submitted", "started", "ended"))
    assert t_sub <= t_start <= t_end
    assert sub["ended"] is None and sub["returncode"] is None
    with open(rec["stdout"], "rb") as f:
        assert f.read() == b"hello\n"
    assert os.path.exists(rec["stderr"]) and os.path.getsize(rec["stderr"]) == 0
    assert rec["status"] in _CORE_STATUSES
    # generated jids are valid and unique
    a = core_mgr.run("true")
    b = core_mgr.run("true")
    assert a["jid"] != b["jid"]
    pman.check_jid(a["jid"])
    core_mgr.wait([a["jid"], b["jid"]], timeout=10)
    # the record returned by get() is a copy: mutating it changes nothing
    got = core_mgr.get("rec")
    got["meta"]["k"].append(3)
    assert core_mgr.get("rec")["meta"] == {"k": [1, 2], "s": "x"}


# ---------------------------------------------------------------------------
# many jobs, foreign children
# ---------------------------------------------------------------------------

def test_core_200_concurrent_exit_codes(core_mgr):
    n = 200
    errors = []

    def submit(start):
        try:
            for i in range(start, n, 4):
                core_mgr.run("sleep 0.2; exit %d" % (i % 7), jid="c%d" % i)
        except Exception as e:       # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=submit, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    recs = core_mgr.wait(["c%d" % i for i in range(n)], timeout=40)
    for i, rec in enumerate(recs):
        assert rec["jid"] == "c%d" % i
        assert rec["returncode"] == i % 7, rec
        assert rec["status"] == ("finishedSuccessfully" if i % 7 == 0 else "finishedWithError")
        assert rec["message"] == "exited with code %d" % (i % 7)
    counts = core_mgr.counts()
    assert counts["finishedSuccessfully"] == len([i for i in range(n) if i % 7 == 0])
    assert counts["finishedWithError"] == n - counts["finishedSuccessfully"]
    assert counts["started"] == counts["notstarted"] == counts["undefined"] == 0


def test_core_foreign_child_status_not_stolen(core_mgr):
    jids = ["f%d" % i for i in range(200)]
    for i, jid in enumerate(jids):
        core_mgr.run("sleep 0.%d" % (i % 10), jid=jid)
    rounds = 0
    deadline = time.monotonic() + 30
    while core_mgr.counts()["started"] and time.monotonic() < deadline:
        r = subprocess.run(["sh", "-c", "sleep 0.02; exit 5"])
        assert r.returncode == 5
        r = subprocess.run(["sh", "-c", "exit 5"])
        assert r.returncode == 5
        rounds += 1
    assert rounds >= 1
    recs = core_mgr.wait(jids, timeout=20)
    assert all(r["returncode"] == 0 and r["status"] == "finishedSuccessfully" for r in recs)
    assert subprocess.run(["sh", "-c", "exit 5"]).returncode == 5


# ---------------------------------------------------------------------------
# kill, timeout, signals
# ---------------------------------------------------------------------------

def test_core_kill_term_trapping_group_with_grace(core_mgr):
    job = core_mgr.run("trap '' TERM; sleep 100 & sleep 100; wait", jid="stubborn")
    pgid = job["pid"]
    # the wrapper leads its own process group
    assert _core_proc_stat(pgid)[2] == pgid
    _core_until(lambda: len([p for p in _core_live(pgid) if p[2] == "sleep"]) >= 2,
                10, "both sleeps of the job to run")
    assert os.getpgid(0) != pgid
    t0 = time.monotonic()
    core_mgr.kill("stubborn", grace=1)
    # TERM is ignored, so the group is still there before the grace ends
    gone = _core_until(lambda: not _core_live(pgid) or None, 2.0,
                       "the job's process group to be gone within grace + 1 s",
                       interval=0.02)
    elapsed = time.monotonic() - t0
    assert gone
    assert elapsed <= 2.0 + 0.1, elapsed
    assert elapsed >= 0.8, "the group died before the grace period: TERM was not ignored?"
    rec = core_mgr.wait("stubborn", timeout=5)
    assert rec["status"] == "finishedWithError"
    assert rec["returncode"] in (-9, -15)
    name = "SIGKILL" if rec["returncode"] == -9 else "SIGTERM"
    assert name in rec["message"] and "on request" in rec["message"], rec["message"]
    assert rec["returncode"] == -9, rec     # TERM was ignored, so SIGKILL ended it
    assert all(p[1] == "Z" for p in _core_group(pgid))


def test_core_kill_plain_job_sigterm(core_mgr):
    job = core_mgr.run("sleep 30", jid="k")
    _core_wait_running(job["pid"])
    rec = core_mgr.kill("k")
    assert rec["jid"] == "k"
    rec = core_mgr.wait("k", timeout=5)
    assert rec["status"] == "finishedWithError"
    assert rec["returncode"] == -15
    assert rec["message"] == "killed by SIGTERM on request"
    _core_until(lambda: not _core_live(job["pid"]) or None, 5, "group gone")
    # signal by name and number
    _core_wait_running(core_mgr.run("sleep 30", jid="k2")["pid"])
    core_mgr.kill("k2", "INT")
    assert core_mgr.wait("k2", timeout=5)["returncode"] == -2
    with pytest.raises(pman.InvalidArgument):
        core_mgr.kill("k2", "NOSUCHSIG")
    with pytest.raises(pman.JobNotFound):
        core_mgr.kill("nope")


def test_core_kill_right_after_start_delivers_sigterm(core_make):
    """A SIGTERM sent as soon as run() returns must reach the job: the job
    ends by SIGTERM (-15), not by the SIGKILL escalation after the grace."""
    m = core_make(grace=0.5)
    jids = []
    for i in range(120):
        jid = "early%d" % i
        m.run("sleep 30" if i % 2 else ["sleep", "30"], jid=jid)
        m.kill(jid)
        jids.append(jid)
    recs = m.wait(jids, timeout=20)
    escalated = [r["jid"] for r in recs if r["returncode"] != -15]
    assert not escalated, ("%d of %d jobs ignored the SIGTERM sent right after "
                           "run() and were SIGKILLed after the grace: %s"
                           % (len(escalated), len(jids), escalated))
    assert all(r["message"] == "killed by SIGTERM on request" for r in recs)


def test_core_kill_finished_job_sends_nothing(core_mgr, tmp_path):
    # the job leaves a background process in its group after it ends
    job = core_mgr.run("sleep 60 >/dev/null 2>&1 </dev/null & echo $!", jid="done")
    rec = core_mgr.wait("done", timeout=10)
    assert rec["status"] == "finishedSuccessfully"
    orphan = int(core_mgr.read_log("done")["data"].decode())
    try:
        assert _core_proc_stat(orphan)[2] == job["pid"]      # same process group
        assert _core_alive(orphan)
        before = core_mgr.get("done")
        after = core_mgr.kill("done")
        assert after == before
        after = core_mgr.kill("done", signal.SIGKILL, grace=0)
        assert after == before
        # observation window (not synchronization): the group got no signal
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            assert _core_alive(orphan), "kill() of a finished job signalled its group"
            time.sleep(0.02)
        assert core_mgr.get("done") == before
    finally:
        try:
            os.kill(orphan, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_core_timeout(core_mgr):
    t0 = time.monotonic()
    core_mgr.run("sleep 30", jid="slow", timeout=0.3)
    rec = core_mgr.wait("slow", timeout=10)
    elapsed = time.monotonic() - t0
    assert rec["status"] == "finishedWithError"
    assert rec["returncode"] == -15
    assert "timed out" in rec["message"], rec["message"]
    assert 0.25 <= elapsed < 5
    # a job that ends in time is not affected
    core_mgr.run("exit 0", jid="fast", timeout=10)
    assert core_mgr.wait("fast", timeout=10)["returncode"] == 0


def test_core_signal_not_sent_by_pman(core_mgr):
    job = core_mgr.run("sleep 30", jid="ext-kill")
    _core_until(lambda: any(p[2] == "sleep" for p in _core_live(job["pid"])), 10, "sleep")
    os.killpg(job["pid"], signal.SIGKILL)
    rec = core_mgr.wait("ext-kill", timeout=10)
    assert rec["returncode"] == 128 + 9
    assert rec["status"] == "finishedWithError"
    assert "SIGKILL" in rec["message"] and "137" in rec["message"]
    assert "shell" in rec["message"]
    job = core_mgr.run("sleep 30", jid="ext-term")
    _core_until(lambda: any(p[2] == "sleep" for p in _core_live(job["pid"])), 10, "sleep")
    os.killpg(job["pid"], signal.SIGTERM)
    rec = core_mgr.wait("ext-term", timeout=10)
    assert rec["returncode"] == 128 + 15
    assert "SIGTERM" in rec["message"] and "143" in rec["message"]


# ---------------------------------------------------------------------------
# queue
# ---------------------------------------------------------------------------

def test_core_queue_order_max_running(core_make, tmp_path):
    m = core_make(max_running=2)
    gate = tmp_path / "gate"
    order = tmp_path / "order"
    jids = ["q%d" % i for i in range(6)]
    for i, jid in enumerate(jids):
        rec = m.run("while [ ! -e '%s' ]; do sleep 0.02; done; echo %d >> '%s'"
                    % (gate, i, order), jid=jid)
        assert rec["status"] == ("started" if i < 2 else "notstarted")
    recs = [m.get(j) for j in jids]
    assert [r["status"] for r in recs] == ["started"] * 2 + ["notstarted"] * 4
    assert all(r["started"] is None and r["pid"] is None for r in recs[2:])
    assert m.counts()["notstarted"] == 4 and m.counts()["started"] == 2
    gate.touch()
    recs = m.wait(jids, timeout=20)
    assert all(r["returncode"] == 0 for r in recs), recs
    starts = [_core_stamp(r["started"]) for r in recs]
    ends = [_core_stamp(r["ended"]) for r in recs]
    assert starts == sorted(starts), "jobs did not start in submission order"
    for k in range(2, 6):
        assert starts[k] >= min(ends[:k])
    for t in starts:        # never more than 2 running at once
        assert sum(1 for s, e in zip(starts, ends) if s <= t < e) <= 2
    assert sorted(order.read_text().split()) == [str(i) for i in range(6)]


def test_core_queued_job_killed(core_make, tmp_path):
    m = core_make(max_running=1)
    blocker = m.run("sleep 30", jid="blocker")
    queued = m.run("echo ran > '%s'" % (tmp_path / "ran"), jid="queued")
    after = m.run("echo after", jid="after")
    assert queued["status"] == "notstarted" and after["status"] == "notstarted"
    rec = m.kill("queued")
    assert rec["status"] == "finishedWithError"
    assert rec["returncode"] is None
    assert rec["started"] is None and rec["pid"] is None
    assert rec["ended"] is not None
    assert m.get("queued") == rec
    _core_wait_running(blocker["pid"])
    m.kill("blocker")
    assert m.wait("blocker", timeout=10)["returncode"] == -15
    assert m.wait("after", timeout=10)["returncode"] == 0
    assert m.get("queued") == rec
    assert not (tmp_path / "ran").exists()


def test_core_rerun_active_jid_conflict(core_make):
    m = core_make(max_running=1)
    m.run("sleep 30", jid="run1")
    m.run("sleep 30", jid="queued1")
    for jid in ("run1", "queued1"):
        with pytest.raises(pman.JobConflict) as ei:
            m.run("true", jid=jid)
        assert ei.value.jid == jid
        assert isinstance(ei.value, pman.PmanError)
    assert m.get("run1")["status"] == "started"
    assert m.get("queued1")["status"] == "notstarted"
    assert m.get("run1")["cmd"] == "sleep 30"
    assert len(m.jobs()) == 2


def test_core_invalid_jids(core_mgr):
    bad = ["", "../x", "a/b", "x\n", "a" * 129, "jobs", "cmd", "hello",
           "openapi.json", ".hidden", "-x", "a b", "é", 123, "x\0"]
    for jid in bad:
        with pytest.raises(pman.InvalidArgument):
            core_mgr.run("true", jid=jid)
        with pytest.raises(ValueError):
            core_mgr.run("true", jid=jid)
    assert core_mgr.jobs() == []
    assert os.listdir(os.path.join(core_mgr.state_dir, "logs")) == []
    assert not os.path.exists(os.path.join(os.path.dirname(core_mgr.state_dir), "x.out"))
    ok = ["a" * 128, "A.b_c-9", "0"]
    for jid in ok:
        core_mgr.run("true", jid=jid)
    core_mgr.wait(ok, timeout=10)
    assert [j["jid"] for j in core_mgr.jobs()] == ok


# ---------------------------------------------------------------------------
# env, cwd, logs, argv, spawn failures
# ---------------------------------------------------------------------------

def test_core_env_merge(core_make, monkeypatch):
    monkeypatch.setenv("CORE_OUTER", "outer")
    m = core_make(env={"CORE_A": "mgr", "CORE_B": "mgr"})
    cmd = 'printf "%s|%s|%s|%s" "$CORE_A" "$CORE_B" "${CORE_C-unset}" "$CORE_OUTER"'
    m.run(cmd, jid="lst", env=["CORE_B=job", "CORE_C=x=y"])
    m.run(cmd, jid="dct", env={"CORE_A": "job-a", "CORE_C": ""})
    m.run(cmd, jid="none")
    recs = m.wait(["lst", "dct", "none"], timeout=10)
    assert all(r["returncode"] == 0 for r in recs)
    assert m.read_log("lst")["data"] == b"mgr|job|x=y|outer"
    assert m.read_log("dct")["data"] == b"job-a|mgr||outer"
    assert m.read_log("none")["data"] == b"mgr|mgr|unset|outer"
    # values are not echoed back, only the keys
    assert recs[0]["env"] == ["CORE_B", "CORE_C"]
    assert "x=y" not in json.dumps(recs[0])
    with pytest.raises(pman.InvalidArgument):
        m.run("true", jid="badenv", env=["NOEQUALS"])
    with pytest.raises(pman.InvalidArgument):
        m.run("true", jid="badenv", env={"": "v"})
    with pytest.raises(pman.JobNotFound):
        m.get("badenv")


def test_core_cwd_and_separate_logs(core_mgr, tmp_path):
    sub = tmp_path / "work dir"
    sub.mkdir()
    tool = sub / "tool.sh"
    tool.write_text("#!/bin/sh\necho tool-ran\n")
    tool.chmod(0o755)
    core_mgr.run("pwd; echo to-err >&2; echo second", jid="cwd", cwd=str(sub))
    core_mgr.run(["./tool.sh"], jid="rel", cwd=str(sub))
    recs = core_mgr.wait(["cwd", "rel"], timeout=10)
    assert [r["returncode"] for r in recs] == [0, 0], recs
    assert core_mgr.read_log("cwd")["data"] == (os.path.realpath(sub) + "\nsecond\n").encode()
    assert core_mgr.read_log("cwd", "stderr")["data"] == b"to-err\n"
    assert core_mgr.read_log("rel")["data"] == b"tool-ran\n"
    with open(recs[0]["stdout"], "rb") as f:
        assert b"to-err" not in f.read()
    with pytest.raises(pman.InvalidArgument):
        core_mgr.read_log("cwd", "both")
    with pytest.raises(pman.JobNotFound):
        core_mgr.read_log("missing")


def test_core_read_log_offset_and_eof(core_mgr, tmp_path):
    gate = tmp_path / "gate"
    core_mgr.run("printf abc; while [ ! -e '%s' ]; do sleep 0.02; done; printf def" % gate,
                 jid="log")
    first = _core_until(lambda: (lambda r: r if r["data"] == b"abc" else None)(
        core_mgr.read_log("log")), 10, "first output")
    assert first["offset"] == 0 and first["next_offset"] == 3
    assert first["eof"] is False
    part = core_mgr.read_log("log", offset=1, limit=1)
    assert part["data"] == b"b" and part["next_offset"] == 2 and part["eof"] is False
    tail = core_mgr.read_log("log", offset=3)
    assert tail["data"] == b"" and tail["next_offset"] == 3 and tail["eof"] is False
    gate.touch()
    core_mgr.wait("log", timeout=10)
    rest = core_mgr.read_log("log", offset=3)
    assert rest["data"] == b"def" and rest["next_offset"] == 6 and rest["eof"] is True
    end = core_mgr.read_log("log", offset=6)
    assert end["data"] == b"" and end["next_offset"] == 6 and end["eof"] is True
    # ended, but more bytes follow the limit: not eof yet
    limited = core_mgr.read_log("log", offset=0, limit=4)
    assert limited["data"] == b"abcd" and limited["next_offset"] == 4
    assert limited["eof"] is False
    assert core_mgr.read_log("log", offset=4, limit=2)["eof"] is True
    err = core_mgr.read_log("log", "stderr")
    assert err["data"] == b"" and err["eof"] is True
    with pytest.raises(pman.InvalidArgument):
        core_mgr.read_log("log", offset=-1)


def test_core_spawn_failure(core_mgr, tmp_path):
    bad_cwd = core_mgr.run("echo hi", jid="badcwd", cwd=str(tmp_path / "no-such-dir"))
    missing = core_mgr.run(["core-no-such-executable-xyz", "arg"], jid="noexe")
    notexec = tmp_path / "plain.txt"
    notexec.write_text("not a program")
    notexec.chmod(0o644)
    noperm = core_mgr.run([str(notexec)], jid="noperm")
    for rec in (bad_cwd, missing, noperm):
        assert rec["status"] == "finishedWithError", rec
        assert "spawn failed" in rec["message"], rec["message"]
        assert rec["returncode"] is None
        assert rec["pid"] is None
        assert rec["ended"] is not None
        assert core_mgr.get(rec["jid"]) == rec
    assert core_mgr.wait(["badcwd", "noexe", "noperm"], timeout=1)
    # the manager still works
    core_mgr.run("echo fine", jid="ok")
    assert core_mgr.wait("ok", timeout=10)["returncode"] == 0
    assert core_mgr.read_log("ok")["data"] == b"fine\n"
    # a spawn-failed jid can be run again
    core_mgr.run("true", jid="badcwd")
    assert core_mgr.wait("badcwd", timeout=10)["returncode"] == 0


def test_core_argv_no_shell(core_mgr, tmp_path):
    args = ["$(touch X)", "a b", "'q'", ";", "*", "`touch Y`", "$HOME", ""]
    rec = core_mgr.run(["printf", "[%s]"] + args, jid="argv", cwd=str(tmp_path))
    assert rec["argv"] == ["printf", "[%s]"] + args
    done = core_mgr.wait("argv", timeout=10)
    assert done["returncode"] == 0
    assert core_mgr.read_log("argv")["data"] == "".join("[%s]" % a for a in args).encode()
    core_mgr.run(["echo", "$(touch X)"], jid="echo", cwd=str(tmp_path))
    core_mgr.wait("echo", timeout=10)
    assert core_mgr.read_log("echo")["data"] == b"$(touch X)\n"
    assert not (tmp_path / "X").exists() and not (tmp_path / "Y").exists()
    # exit code of an argv job
    core_mgr.run(["sh", "-c", "exit 6"], jid="code")
    assert core_mgr.wait("code", timeout=10)["returncode"] == 6


# ---------------------------------------------------------------------------
# threads and file descriptors
# ---------------------------------------------------------------------------

def test_core_threads_and_fds_bounded(core_make, tmp_path):
    base_threads = threading.active_count()
    m = core_make()
    m.run("true", jid="warm")
    m.wait("warm", timeout=10)
    m.flush()
    base_fds = len(os.listdir("/proc/self/fd"))
    gate = tmp_path / "gate"
    gate.touch()
    # Hold the 300 jobs running until the checks are done, however slowly
    # they were submitted: each takes a shared flock the test holds
    # exclusively (or, without flock(1), polls once a second for a file).
    if shutil.which("flock"):
        cmd = "flock -s '%s' sleep 0.1" % gate
        held = open(gate, "rb")
        fcntl.flock(held, fcntl.LOCK_EX)
        release = held.close
    else:                                   # pragma: no cover
        gate.unlink()
        cmd = "while [ ! -e '%s' ]; do sleep 1; done" % gate
        release = gate.touch
    try:
        max_threads = threading.active_count()
        for i in range(300):
            m.run(cmd, jid="s%d" % i)
            if i % 25 == 0:
                max_threads = max(max_threads, threading.active_count())
        assert m.counts()["started"] == 300, m.counts()
        max_threads = max(max_threads, threading.active_count())
        assert max_threads <= base_threads + 3, (max_threads, base_threads)
    finally:
        release()
    recs = m.wait(["s%d" % i for i in range(300)], timeout=30)
    assert all(r["returncode"] == 0 for r in recs)
    for i in range(699):
        m.run("true", jid="t%d" % i)
    assert threading.active_count() <= base_threads + 3
    recs = m.wait(["t%d" % i for i in range(699)], timeout=30)
    assert all(r["returncode"] == 0 for r in recs)
    assert sum(m.counts().values()) == 1000
    m.flush()
    _core_until(lambda: len(os.listdir("/proc/self/fd")) <= base_fds + 2, 5,
                "fd count back to baseline (was %d)" % base_fds)


# ---------------------------------------------------------------------------
# on_end
# ---------------------------------------------------------------------------

def test_core_on_end_once_per_job_outside_lock(core_make, tmp_path):
    calls = []
    holder = {}

    def on_end(record):
        got = {}

        def fetch():
            got["rec"] = holder["m"].get(record["jid"])

        t = threading.Thread(target=fetch)
        t.start()
        t.join(5)       # blocks (and reports) if the manager lock is held
        calls.append((record, got.get("rec"), threading.current_thread() is not threading.main_thread()))

    m = core_make(on_end=on_end)
    holder["m"] = m
    jids = ["e%d" % i for i in range(5)]
    for i, jid in enumerate(jids):
        m.run("exit %d" % i, jid=jid)
    _core_wait_running(m.run("sleep 30", jid="killed")["pid"])
    m.run("true", jid="nocwd", cwd=str(tmp_path / "missing"))
    m.kill("killed")
    everything = jids + ["killed", "nocwd"]
    m.wait(everything, timeout=10)
    _core_until(lambda: len(calls) >= len(everything), 10, "on_end calls")
    m.run("true", jid="sentinel")
    m.wait("sentinel", timeout=10)
    _core_until(lambda: any(c[0]["jid"] == "sentinel" for c in calls), 10, "sentinel on_end")
    seen = [c[0]["jid"] for c in calls]
    for jid in everything + ["sentinel"]:
        assert seen.count(jid) == 1, (jid, seen)
    for record, fetched, from_reaper in calls:
        assert fetched is not None, "on_end ran with the manager lock held"
        assert fetched == record
        assert from_reaper
        assert record["status"] in ("finishedSuccessfully", "finishedWithError")
        json.dumps(record)
    by_jid = {c[0]["jid"]: c[0] for c in calls}
    for i, jid in enumerate(jids):
        assert by_jid[jid]["returncode"] == i
    assert by_jid["killed"]["returncode"] == -15
    assert "spawn failed" in by_jid["nocwd"]["message"]


# ---------------------------------------------------------------------------
# listing, waiting, removing
# ---------------------------------------------------------------------------

def test_core_jobs_filters(core_mgr):
    m = core_mgr
    m.run("exit 0", jid="a", auid="alice", meta={"k": 1, "t": "x"})
    m.run("exit 1", jid="b", auid="alice", meta={"k": 2})
    m.run("exit 0", jid="c", auid="bob", meta={"k": 1})
    m.run("sleep 30", jid="d", auid="bob", meta={"k": 1, "t": "x"})
    m.wait(["a", "b", "c"], timeout=10)

    def ids(**kw):
        return [j["jid"] for j in m.jobs(**kw)]

    assert ids() == ["a", "b", "c", "d"]
    assert ids(status="finishedSuccessfully") == ["a", "c"]
    assert ids(status=("finishedWithError", "started")) == ["b", "d"]
    assert ids(status="notstarted") == []
    assert ids(auid="alice") == ["a", "b"]
    assert ids(auid="nobody") == []
    assert ids(meta={"k": 1}) == ["a", "c", "d"]
    assert ids(meta={"k": 1, "t": "x"}) == ["a", "d"]
    assert ids(meta={"t": "y"}) == []
    assert ids(auid="bob", meta={"k": 1}, status="started") == ["d"]
    assert ids(limit=2) == ["a", "b"]
    assert ids(after="b") == ["c", "d"]
    assert ids(after="b", limit=1) == ["c"]
    assert ids(after="d") == []
    with pytest.raises(pman.InvalidArgument):
        m.jobs(status="running")
    with pytest.raises(pman.JobNotFound):
        m.jobs(after="zzz")
    full = m.jobs(auid="alice")
    assert full[0]["status"] == "finishedSuccessfully" and full[1]["returncode"] == 1


def test_core_wait_list_and_timeout(core_mgr):
    m = core_mgr
    m.run("exit 1", jid="w1")
    m.run("sleep 0.2; exit 2", jid="w2")
    recs = m.wait(["w2", "w1"], timeout=10)
    assert [r["jid"] for r in recs] == ["w2", "w1"]
    assert [r["returncode"] for r in recs] == [2, 1]
    assert m.wait([], timeout=1) == []
    m.run("sleep 30", jid="long")
    t0 = time.monotonic()
    with pytest.raises(pman.Timeout) as ei:
        m.wait(["w1", "long"], timeout=0.3)
    elapsed = time.monotonic() - t0
    assert 0.25 <= elapsed < 3
    assert isinstance(ei.value, TimeoutError)
    assert [r["jid"] for r in ei.value.jobs] == ["w1", "long"]
    assert ei.value.jobs[1]["status"] == "started"
    with pytest.raises(pman.Timeout) as ei:
        m.wait("long", timeout=0.05)
    assert ei.value.jobs["jid"] == "long" and ei.value.jobs["returncode"] is None
    with pytest.raises(pman.JobNotFound):
        m.wait("ghost", timeout=1)
    assert m.get("long")["status"] == "started"


def test_core_remove(core_mgr):
    m = core_mgr
    job = m.run("echo x; sleep 30", jid="r")
    _core_until(lambda: m.read_log("r")["data"] == b"x\n", 10, "output")
    with pytest.raises(pman.JobConflict):
        m.remove("r")
    assert m.get("r")["status"] == "started"
    assert _core_live(job["pid"])
    m.remove("r", kill=True)
    with pytest.raises(pman.JobNotFound):
        m.get("r")
    assert not os.path.exists(job["stdout"]) and not os.path.exists(job["stderr"])
    _core_until(lambda: not _core_live(job["pid"]) or None, 5, "killed job gone")
    assert "r" not in [j["jid"] for j in m.jobs()]
    # a finished job is removed without kill
    done = m.run("echo y", jid="f")
    m.wait("f", timeout=10)
    assert os.path.exists(done["stdout"])
    m.remove("f")
    assert not os.path.exists(done["stdout"]) and not os.path.exists(done["stderr"])
    with pytest.raises(pman.JobNotFound):
        m.remove("f")
    assert sum(m.counts().values()) == 0
    # the jid is free again
    m.run("exit 3", jid="r")
    assert m.wait("r", timeout=10)["returncode"] == 3


# ---------------------------------------------------------------------------
# persistence and lifecycle
# ---------------------------------------------------------------------------

def test_core_close_and_reopen_sees_outcomes(core_make, tmp_path):
    state = tmp_path / "state"
    m = core_make(state)
    m.run("echo ok", jid="ok")
    m.run("exit 3", jid="bad", auid="u", meta={"m": 1})
    _core_wait_running(m.run("sleep 30", jid="killed")["pid"])
    m.kill("killed")
    m.run(["core-missing-binary-xyz"], jid="spawnfail")
    g1, g2 = tmp_path / "g1", tmp_path / "g2"
    late1 = m.run("while [ ! -e '%s' ]; do sleep 0.02; done; exit 4" % g1, jid="late1")
    late2 = m.run("while [ ! -e '%s' ]; do sleep 0.02; done; exit 5" % g2, jid="late2")
    before = {r["jid"]: r for r in m.wait(["ok", "bad", "killed", "spawnfail"], timeout=10)}
    m.close()
    with pytest.raises(pman.PmanError):
        m.run("true", jid="after-close")
    # late1 ends while no manager watches it
    g1.touch()
    _core_until(lambda: not _core_alive(late1["pid"]), 10, "late1 to end")
    m2 = core_make(state)
    assert m2 is not m
    assert [j["jid"] for j in m2.jobs()] == ["ok", "bad", "killed", "spawnfail", "late1", "late2"]
    for jid, rec in before.items():
        assert m2.get(jid) == rec, jid
    assert m2.get("killed")["returncode"] == -15
    r1 = m2.wait("late1", timeout=10)
    assert r1["returncode"] == 4 and r1["status"] == "finishedWithError", r1
    assert m2.get("late2")["status"] == "started"
    g2.touch()
    r2 = m2.wait("late2", timeout=10)
    assert r2["returncode"] == 5 and r2["status"] == "finishedWithError", r2
    assert r2["pid"] == late2["pid"]
    assert m2.read_log("ok")["data"] == b"ok\n"


def test_core_context_manager_and_lock(tmp_path):
    state = str(tmp_path / "state")
    with pman.JobManager(state) as m:
        m.run("exit 7", jid="cm")
        assert m.wait("cm", timeout=10)["returncode"] == 7
    with pytest.raises(pman.PmanError):
        m.run("true", jid="x")
    probe = ("import sys; import pman\n"
             "try:\n"
             "    m = pman.JobManager(%r)\n"
             "except pman.StateLocked as e:\n"
             "    print('locked', e.pid)\n"
             "else:\n"
             "    print('open', m.get('cm')['returncode']); m.close()\n" % state)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=30)
    assert out.stdout.split() == ["open", "7"], out.stderr
    m2 = pman.JobManager(state)
    try:
        assert m2 is not m
        assert m2.get("cm")["returncode"] == 7
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True,
                             text=True, timeout=30)
        assert out.stdout.split() == ["locked", str(os.getpid())], out.stderr
    finally:
        m2.close(kill=True)


def test_core_log_limit(core_make):
    m = core_make(log_limit=10000)
    m.run("head -c 20000 /dev/zero; sleep 30", jid="noisy-out")
    m.run("head -c 20000 /dev/zero >&2; sleep 30", jid="noisy-err")
    m.run("head -c 5000 /dev/zero; head -c 5000 /dev/zero >&2", jid="quiet")
    recs = m.wait(["noisy-out", "noisy-err", "quiet"], timeout=15)
    out, err, quiet = recs
    for rec, stream in ((out, "stdout"), (err, "stderr")):
        assert rec["status"] == "finishedWithError"
        assert rec["returncode"] == -15
        assert "10000" in rec["message"] and "limit" in rec["message"], rec["message"]
        assert stream in rec["message"]
    assert quiet["returncode"] == 0 and quiet["status"] == "finishedSuccessfully"


def test_core_keep_finished_retention(core_make):
    m = core_make(keep_finished=2)
    m.run("sleep 30", jid="runner")
    paths = {}
    for i in range(5):
        rec = m.run("echo %d; echo e%d >&2" % (i, i), jid="k%d" % i)
        paths["k%d" % i] = (rec["stdout"], rec["stderr"])
        m.wait("k%d" % i, timeout=10)
    _core_until(lambda: [j["jid"] for j in m.jobs()] == ["runner", "k3", "k4"], 10,
                "retention to forget the oldest finished jobs")
    assert m.get("runner")["status"] == "started"
    for i in range(3):
        with pytest.raises(pman.JobNotFound):
            m.get("k%d" % i)
    _core_until(lambda: not any(os.path.exists(p) for i in range(3)
                                for p in paths["k%d" % i]), 10, "old logs removed")
    for jid in ("k3", "k4"):
        assert all(os.path.exists(p) for p in paths[jid])
    assert m.read_log("k4")["data"] == b"4\n"
    # once the runner ends, only 2 finished jobs remain
    m.kill("runner")
    _core_until(lambda: (lambda js: len(js) == 2 and all(
        j["status"] == "finishedWithError" or j["status"] == "finishedSuccessfully"
        for j in js))(m.jobs()), 10, "retention after the runner ended")


def test_core_forget_keep(core_mgr):
    m = core_mgr
    m.run("sleep 30", jid="active")
    outs = {}
    for i in range(5):
        outs["f%d" % i] = m.run("echo %d" % i, jid="f%d" % i)["stdout"]
        m.wait("f%d" % i, timeout=10)
    assert m.forget(keep=2) == 3
    assert [j["jid"] for j in m.jobs()] == ["active", "f3", "f4"]
    for i in range(3):
        assert not os.path.exists(outs["f%d" % i])
    assert os.path.exists(outs["f3"])
    assert m.forget(keep=5) == 0
    assert m.forget() == 2
    assert [j["jid"] for j in m.jobs()] == ["active"]
    assert m.get("active")["status"] == "started"
    assert not os.path.exists(outs["f4"])
    with pytest.raises(pman.InvalidArgument):
        m.forget(keep=-1)


def test_core_durable_false_persists_after_close(core_make, tmp_path):
    state = tmp_path / "state"
    m = core_make(state, durable=False)
    m.run("exit 0", jid="d1", meta={"x": 1})
    m.run("exit 9", jid="d2")
    recs = m.wait(["d1", "d2"], timeout=10)
    _core_wait_running(m.run("sleep 30", jid="d3")["pid"])
    m.kill("d3")
    recs.append(m.wait("d3", timeout=10))
    m.close()
    m2 = core_make(state)
    assert [m2.get(r["jid"]) for r in recs] == recs
    assert [r["returncode"] for r in recs] == [0, 9, -15]


# ---------------------------------------------------------------------------
# fallback reaper (no pidfd)
# ---------------------------------------------------------------------------

def test_core_fallback_reaper_without_pidfd(core_make, monkeypatch, tmp_path):
    monkeypatch.setattr(pman, "_HAVE_PIDFD", False)
    m = core_make(grace=1)
    assert getattr(m, "_selector", None) is None     # the polling reaper is in use
    jids = ["p%d" % i for i in range(6)]
    for i, jid in enumerate(jids):
        m.run("sleep 0.%d; exit %d" % (i, i), jid=jid)
    m.run(["sh", "-c", "exit 3"], jid="pargv")
    assert subprocess.run(["sh", "-c", "sleep 0.1; exit 5"]).returncode == 5
    recs = m.wait(jids + ["pargv"], timeout=10)
    assert [r["returncode"] for r in recs] == [0, 1, 2, 3, 4, 5, 3]
    assert recs[0]["status"] == "finishedSuccessfully"
    _core_wait_running(m.run("sleep 30", jid="pkill")["pid"])
    m.kill("pkill")
    rec = m.wait("pkill", timeout=10)
    assert rec["returncode"] == -15 and rec["message"] == "killed by SIGTERM on request"
    job = m.run("trap '' TERM; sleep 100 & sleep 100; wait", jid="pstubborn")
    _core_until(lambda: len([p for p in _core_live(job["pid"]) if p[2] == "sleep"]) >= 2,
                10, "sleeps")
    m.kill("pstubborn")                       # manager grace: 1 s
    rec = m.wait("pstubborn", timeout=5)
    assert rec["returncode"] == -9
    _core_until(lambda: not _core_live(job["pid"]) or None, 2, "stubborn group gone")
    m.run("sleep 30", jid="ptimeout", timeout=0.2)
    rec = m.wait("ptimeout", timeout=10)
    assert rec["returncode"] == -15 and "timed out" in rec["message"]


# ===========================================================================
# cmd
# ===========================================================================
_CMD_INFO_FIELDS = ("cmd", "jid", "auid", "pid", "started", "startTrigger", "done",
                    "doneTrigger", "returncode", "startstamp", "endstamp", "stdout",
                    "stderr")
_CMD_ENVELOPE = {"status", "action", "meta", "path", "RESTverb", "d_ret"}
_CMD_NO_HIT = {"-1": {"noJobFound": {"endInfo": {"allJobsDone": None}}}}
_CMD_DEADLINE = 15.0


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

class _CmdServer:
    """A JobManager on its own state dir, served over HTTP on port 0."""

    def __init__(self, state_dir, **options):
        self.state_dir = str(state_dir)
        self.manager = pman.JobManager(self.state_dir, **options)
        self.srv = pman.make_server(self.manager, "127.0.0.1", 0)
        self.port = self.srv.server_address[1]
        self.thread = threading.Thread(target=self.srv.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def connect(self):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)

    def request(self, method, path, body=None, raw=None, conn=None):
        """(status, JSON object) of one request; checks the reply framing."""
        own = conn is None
        conn = conn or self.connect()
        try:
            data = raw if raw is not None else (None if body is None else json.dumps(body))
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            assert resp.version == 11, "status line must be HTTP/1.1"
            assert resp.getheader("Content-Type", "").startswith("application/json")
            assert int(resp.getheader("Content-Length")) == len(payload)
            obj = json.loads(payload.decode("utf-8"))
            assert isinstance(obj, dict)
            return resp.status, obj
        finally:
            if own:
                conn.close()

    def cmd(self, action, meta=None, wrap=True, conn=None, **extra):
        payload = {"action": action}
        if meta is not None:
            payload["meta"] = meta
        payload.update(extra)
        return self.request("POST", "/api/v1/cmd/", {"payload": payload} if wrap else payload,
                            conn=conn)

    def ok(self, action, meta=None, **extra):
        """A command expected to succeed: the envelope, checked."""
        status, env = self.cmd(action, meta, **extra)
        assert status == 200, env
        _cmd_check_envelope(env, action, meta if meta is not None else {},
                            extra=("jobRootDir",) if action == "run" else ())
        assert env["status"] is True, env
        return env

    def get(self, path):
        return self.request("GET", path)

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()
        self.manager.close(kill=True)


def _cmd_check_envelope(env, action, meta, extra=()):
    assert set(env) == _CMD_ENVELOPE | set(extra), env
    assert env["action"] == action
    assert env["meta"] == meta
    assert env["path"] == "/api/v1/cmd"
    assert env["RESTverb"] == "POST"
    assert isinstance(env["status"], bool)
    assert "receivedByServer" not in env


def _cmd_check_error(status, obj, code, action=...):
    assert status == code, obj
    assert obj["status"] is False, obj
    assert isinstance(obj["message"], str) and obj["message"], obj
    if action is not ...:
        assert obj["action"] == action, obj
        assert obj["path"] == "/api/v1/cmd"
        assert obj["RESTverb"] == "POST"


def _cmd_iso(stamp):
    parsed = datetime.fromisoformat(stamp)
    assert parsed.tzinfo is not None, stamp
    return parsed


def _cmd_check_info(info, *, jid, cmd, auid, pid, returncode, done=True):
    """INFO: the original runner's fields, checked one by one."""
    for field in _CMD_INFO_FIELDS:
        assert field in info, (field, info)
    assert info["jid"] == jid
    assert info["cmd"] == cmd
    assert info["auid"] == auid
    assert info["pid"] == pid and isinstance(pid, int)
    assert info["started"] is True and info["startTrigger"] is True
    assert info["done"] is done and info["doneTrigger"] is done
    assert info["returncode"] == returncode
    _cmd_iso(info["startstamp"])
    if done:
        assert _cmd_iso(info["endstamp"]) >= _cmd_iso(info["startstamp"])
    else:
        assert info["endstamp"] == ""
    assert isinstance(info["stdout"], str) and isinstance(info["stderr"], str)


def _cmd_check_record(rec, *, jid, cmd, auid, meta):
    """The job record returned by run / kill (resource-dialect shape)."""
    for field in ("jid", "cmd", "status", "message", "timestamp", "returncode", "pid",
                  "auid", "meta"):
        assert field in rec, (field, rec)
    assert rec["jid"] == jid
    assert rec["cmd"] == cmd
    assert rec["auid"] == auid
    assert rec["meta"] == meta
    assert rec["status"] in pman.STATUSES
    assert isinstance(rec["message"], str) and rec["message"]
    _cmd_iso(rec["timestamp"])


def _cmd_status(server, key, value):
    env = server.ok("status", {"key": key, "value": value})
    return env["d_ret"]


def _cmd_wait_finished(server, jid, timeout=_CMD_DEADLINE):
    """Poll `status` until the job's l_status says finished; its d_ret."""
    deadline = time.monotonic() + timeout
    while True:
        d_ret = _cmd_status(server, "jid", jid)
        if d_ret["l_status"][0].startswith("finished"):
            return d_ret
        assert time.monotonic() < deadline, "job %s did not finish: %r" % (jid, d_ret)
        time.sleep(0.02)


def _cmd_wait_quiet(manager, timeout=_CMD_DEADLINE):
    """Wait until the reaper has made every ending durable (it removes the
    .rc files only after that), so the state dir stops changing."""
    deadline = time.monotonic() + timeout
    while any(n.endswith(".rc") for n in os.listdir(manager.log_dir)):
        assert time.monotonic() < deadline, os.listdir(manager.log_dir)
        time.sleep(0.02)


def _cmd_snapshot(state_dir):
    out = {}
    for root, dirs, files in os.walk(state_dir):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.stat(path)
            out[os.path.relpath(path, state_dir)] = (st.st_size, st.st_mtime_ns)
    st = os.stat(state_dir)
    out["."] = (st.st_size, st.st_mtime_ns)
    return out


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------

@pytest.fixture
def cmd_factory(tmp_path):
    made = []

    def make(name="state", **options):
        server = _CmdServer(tmp_path / name, **options)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


@pytest.fixture
def cmd_server(cmd_factory):
    return cmd_factory()


# ---------------------------------------------------------------------------
# 1. the original README request
# ---------------------------------------------------------------------------

def test_cmd_readme_request_verbatim_and_index_walks(cmd_server):
    request = {"payload": {"exec": {"cmd": "cal 7 1970"}, "action": "run",
                           "meta": {"jid": "123-456-1", "auid": "rudolphpienaar"}}}
    status, env = cmd_server.request("POST", "/api/v1/cmd/", request)
    assert status == 200, env
    _cmd_check_envelope(env, "run", {"jid": "123-456-1", "auid": "rudolphpienaar"},
                        extra=("jobRootDir",))
    assert env["status"] is True
    assert env["jobRootDir"] == "123-456-1"
    first = env["d_ret"]
    _cmd_check_record(first, jid="123-456-1", cmd="cal 7 1970", auid="rudolphpienaar",
                      meta={})
    assert isinstance(first["pid"], int)

    d_ret = _cmd_wait_finished(cmd_server, "123-456-1")
    has_cal = shutil.which("cal") is not None
    rc1 = d_ret["0.end"]["returncode"][0]
    if has_cal:
        assert rc1 == 0

    second = cmd_server.ok("run", {"cmd": "echo second; exit 4", "jid": "123-456-2",
                                   "auid": "rudolphpienaar"})
    pid2 = second["d_ret"]["pid"]
    _cmd_wait_finished(cmd_server, "123-456-2")

    status, reply = cmd_server.get("/api/v1/_01/endInfo")
    assert status == 200, reply
    assert set(reply) == {"status", "path", "GET"}
    assert reply["status"] is True
    assert reply["path"] == "/api/v1/_01/endInfo"
    assert list(reply["GET"]) == ["123-456-2"]
    assert list(reply["GET"]["123-456-2"]) == ["endInfo"]
    assert list(reply["GET"]["123-456-2"]["endInfo"]) == ["0"]
    info = reply["GET"]["123-456-2"]["endInfo"]["0"]
    _cmd_check_info(info, jid="123-456-2", cmd="echo second; exit 4",
                    auid="rudolphpienaar", pid=pid2, returncode=4)
    assert info["stdout"] == "second\n"

    status, reply = cmd_server.get("/api/v1/_0/endInfo")
    assert status == 200, reply
    assert reply["path"] == "/api/v1/_0/endInfo"
    info = reply["GET"]["123-456-1"]["endInfo"]["0"]
    _cmd_check_info(info, jid="123-456-1", cmd="cal 7 1970", auid="rudolphpienaar",
                    pid=first["pid"], returncode=rc1)
    if has_cal:
        assert "July 1970" in info["stdout"]
    else:
        assert rc1 != 0

    # the run record has the resource dialect's shape (same keys as POST /api/v1/)
    status, created = cmd_server.request("POST", "/api/v1/", {"jid": "shape", "cmd": "true"})
    assert status == 201
    assert set(first) == set(created)
    status, reply = cmd_server.get("/api/v1/_02/jid")
    assert status == 200 and reply["GET"] == {"shape": {"jid": "shape"}}


def test_cmd_exec_cmd_with_cal_when_available(cmd_server):
    """`exec.cmd` and `meta.cmd`: meta wins when both are given."""
    env = cmd_server.ok("run", {"jid": "both", "cmd": "echo from-meta"},
                        exec={"cmd": "echo from-exec"})
    assert env["d_ret"]["cmd"] == "echo from-meta"
    _cmd_wait_finished(cmd_server, "both")
    status, reply = cmd_server.get("/api/v1/both/endInfo/0/stdout")
    assert status == 200 and reply["GET"]["both"]["endInfo"]["0"]["stdout"] == "from-meta\n"


# ---------------------------------------------------------------------------
# 2. the pfurl / ChRIS-backend flow
# ---------------------------------------------------------------------------

def test_cmd_pfurl_flow_run_status_search_info_done(cmd_server):
    jid = "chris-jid-1"
    cmd = "echo out; echo err >&2; exit 3"
    meta = {"cmd": cmd, "jid": jid, "auid": "chris", "threaded": True, "container": "x"}
    env = cmd_server.ok("run", meta)
    assert env["jobRootDir"] == jid
    # meta keys other than cmd/jid/auid/threaded are stored verbatim
    _cmd_check_record(env["d_ret"], jid=jid, cmd=cmd, auid="chris", meta={"container": "x"})
    pid = env["d_ret"]["pid"]

    d_ret = _cmd_wait_finished(cmd_server, jid)
    assert d_ret == {"0.start": {"jobRoot": jid, "startTrigger": [True]},
                     "0.end": {"jobRoot": jid, "returncode": [3]},
                     "l_status": ["finishedWithError"]}

    # search for the stderr of job 0's end
    smeta = {"key": "jid", "value": jid, "job": "0", "when": "end", "field": "stderr"}
    env = cmd_server.ok("search", smeta)
    assert env["d_ret"] == {"0": {jid: "err\n"}}
    # when=start, field pid
    env = cmd_server.ok("search", {"key": "jid", "value": jid, "job": "0", "when": "start",
                                   "field": "pid"})
    assert env["d_ret"] == {"0": {jid: pid}}
    # with a path
    env = cmd_server.ok("search", {"key": "jid", "value": jid, "path": "/endInfo/0/returncode"})
    assert env["d_ret"] == {"0": {jid: 3}}

    # info
    env = cmd_server.ok("info", {"key": "jid", "value": jid})
    d_ret = env["d_ret"]
    assert set(d_ret) == {"0.0", "0.1"}
    assert list(d_ret["0.0"]) == [jid] and list(d_ret["0.0"][jid]) == ["startInfo"]
    assert list(d_ret["0.1"]) == [jid] and list(d_ret["0.1"][jid]) == ["endInfo"]
    start = d_ret["0.0"][jid]["startInfo"]
    end = d_ret["0.1"][jid]["endInfo"]
    assert list(start) == ["0"] and list(end) == ["0"]
    _cmd_check_info(start["0"], jid=jid, cmd=cmd, auid="chris", pid=pid, returncode=3)
    assert start["0"] == end["0"]
    assert end["0"]["stdout"] == "out\n" and end["0"]["stderr"] == "err\n"
    # info's values are the tree's values
    status, reply = cmd_server.get("/api/v1/%s/endInfo" % jid)
    assert status == 200 and reply["GET"][jid]["endInfo"] == end

    # done: status without l_status
    env = cmd_server.ok("done", {"key": "jid", "value": jid})
    assert env["d_ret"] == {"0.start": {"jobRoot": jid, "startTrigger": [True]},
                            "0.end": {"jobRoot": jid, "returncode": [3]}}


def test_cmd_hello_sysinfo_echoback_timestamp(cmd_server):
    env = cmd_server.ok("hello", {"askAbout": "sysinfo"})
    assert list(env["d_ret"]) == ["sysinfo"]
    info = env["d_ret"]["sysinfo"]
    for key in ("system", "machine", "platform", "version", "cpucount", "loadavg",
                "hostname"):
        assert key in info, key
    assert info["system"] == platform.system()
    assert info["machine"] == platform.machine()
    assert info["platform"] == platform.platform()
    assert info["version"] == platform.version()
    assert info["cpucount"] == os.cpu_count() and isinstance(info["cpucount"], int)
    assert isinstance(info["loadavg"], list) and len(info["loadavg"]) == 3
    assert all(isinstance(x, (int, float)) for x in info["loadavg"])
    assert info["hostname"] == socket.gethostname()

    env = cmd_server.ok("hello", {"askAbout": "echoBack", "echoBack": "hello pman é"})
    assert env["d_ret"] == {"echoBack": {"msg": "hello pman é"}}

    env = cmd_server.ok("hello", {"askAbout": "timestamp"})
    assert list(env["d_ret"]) == ["timestamp"] and list(env["d_ret"]["timestamp"]) == ["now"]
    now = datetime.strptime(env["d_ret"]["timestamp"]["now"], "%Y%m%d%H%M%S.%f")
    assert abs((now - datetime.now()).total_seconds()) < 120


def test_cmd_kill_running_job_ends_minus_15(cmd_server):
    jid = "sleeper"
    cmd_server.ok("run", {"cmd": "sleep 30", "jid": jid})
    d_ret = _cmd_status(cmd_server, "jid", jid)
    assert d_ret == {"0.start": {"jobRoot": jid, "startTrigger": [True]},
                     "0.end": {"jobRoot": jid, "returncode": []},
                     "l_status": ["started"]}
    meta = {"jid": jid, "signal": "SIGTERM", "grace": 5}
    env = cmd_server.ok("kill", meta)
    _cmd_check_record(env["d_ret"], jid=jid, cmd="sleep 30", auid="", meta={})
    assert env["d_ret"]["status"] in ("started", "finishedWithError")
    d_ret = _cmd_wait_finished(cmd_server, jid)
    assert d_ret["0.end"] == {"jobRoot": jid, "returncode": [-15]}
    assert d_ret["l_status"] == ["finishedWithError"]
    status, reply = cmd_server.get("/api/v1/%s/endInfo/0/message" % jid)
    assert status == 200
    assert reply["GET"][jid]["endInfo"]["0"]["message"] == "killed by SIGTERM on request"


def test_cmd_kill_with_numeric_signal(cmd_server):
    cmd_server.ok("run", {"cmd": "sleep 30", "jid": "k9"})
    env = cmd_server.ok("kill", {"jid": "k9", "signal": 9})
    assert env["d_ret"]["jid"] == "k9"
    d_ret = _cmd_wait_finished(cmd_server, "k9")
    assert d_ret["0.end"]["returncode"] == [-9]


def test_cmd_delete_running_and_finished(cmd_server):
    cmd_server.ok("run", {"cmd": "sleep 30", "jid": "del-run"})
    cmd_server.ok("run", {"cmd": "echo x", "jid": "del-done"})
    _cmd_wait_finished(cmd_server, "del-done")
    log_dir = cmd_server.manager.log_dir
    assert os.path.exists(os.path.join(log_dir, "del-done.out"))

    for key, jid in (("value", "del-run"), ("jid", "del-done")):
        env = cmd_server.ok("delete", {key: jid})
        assert env["d_ret"] == {"action": "Delete Job", "job_id": jid,
                                "status": "Job deleted successfully"}
        for path in ("/api/v1/%s/jid" % jid, "/api/v1/%s/endInfo" % jid, "/api/v1/%s/" % jid):
            status, reply = cmd_server.get(path)
            assert status == 404 and reply["status"] is False, (path, reply)
        status, env = cmd_server.cmd("status", {"key": "jid", "value": jid})
        assert status == 200 and env["status"] is False
        assert not [n for n in os.listdir(log_dir) if n.startswith(jid + ".")]
    status, reply = cmd_server.get("/api/v1/")
    assert reply["GET"] == {}
    # deleting again: no such job
    status, env = cmd_server.cmd("delete", {"value": "del-run"})
    _cmd_check_error(status, env, 404, action="delete")


def test_cmd_dbctl_save_load_clear(cmd_factory):
    server = cmd_factory(max_running=1)
    server.ok("run", {"cmd": "echo old", "jid": "db-done"})
    _cmd_wait_finished(server, "db-done")
    run = server.ok("run", {"cmd": "sleep 30", "jid": "db-run"})
    pid = run["d_ret"]["pid"]
    server.ok("run", {"cmd": "echo q", "jid": "db-queued"})

    env = server.ok("DBctl", {"do": "save"})
    snap = os.path.join(server.state_dir, pman.SNAPSHOT)
    with open(snap) as f:
        text = f.read()
    for jid in ("db-done", "db-run", "db-queued"):
        assert '"%s"' % jid in text

    env = server.ok("DBctl", {"do": "load"})
    status, reply = server.get("/api/v1/")
    assert list(reply["GET"]) == ["db-done", "db-run", "db-queued"]
    d_ret = _cmd_status(server, "jid", "db-run")
    assert d_ret["l_status"] == ["started"]        # running jobs untouched by load
    status, reply = server.get("/api/v1/db-run/startInfo/0/pid")
    assert reply["GET"]["db-run"]["startInfo"]["0"]["pid"] == pid
    status, reply = server.get("/api/v1/db-done/endInfo/0/stdout")
    assert reply["GET"]["db-done"]["endInfo"]["0"]["stdout"] == "old\n"

    env = server.ok("DBctl", {"do": "clear"})
    status, reply = server.get("/api/v1/")
    assert list(reply["GET"]) == ["db-run", "db-queued"]   # never running/queued ones
    status, env = server.cmd("status", {"key": "jid", "value": "db-done"})
    assert env["status"] is False
    assert _cmd_status(server, "jid", "db-run")["l_status"] == ["started"]
    assert _cmd_status(server, "jid", "db-queued")["l_status"] == ["notstarted"]


def test_cmd_quit_saves_and_stops_serving(cmd_factory, tmp_path):
    server = cmd_factory("quitstate")
    server.ok("run", {"cmd": "exit 6", "jid": "q-done"})
    _cmd_wait_finished(server, "q-done")
    run = server.ok("run", {"cmd": "sleep 30", "jid": "q-run"})
    pid = run["d_ret"]["pid"]

    status, env = server.cmd("quit", {"saveDB": True})
    assert status == 200, env
    _cmd_check_envelope(env, "quit", {"saveDB": True})
    assert env["status"] is True and env["d_ret"] == {}
    server.thread.join(_CMD_DEADLINE)
    assert not server.thread.is_alive(), "serve_forever did not return after quit"
    with open(os.path.join(server.state_dir, pman.SNAPSHOT)) as f:
        text = f.read()
    assert '"q-done"' in text and '"q-run"' in text

    server.manager.close()          # no kill: the running job keeps running
    os.kill(pid, 0)
    again = pman.JobManager(server.state_dir)
    try:
        assert again.jids() == ["q-done", "q-run"]
        assert again.get("q-done")["returncode"] == 6
        assert again.get("q-run")["status"] == "started"
        assert again.get("q-run")["pid"] == pid
    finally:
        again.close(kill=True)


# ---------------------------------------------------------------------------
# 3. triggers and return codes over a job's life
# ---------------------------------------------------------------------------

def test_cmd_status_triggers_queued_running_cancelled(cmd_factory):
    server = cmd_factory(max_running=1)
    server.ok("run", {"cmd": "sleep 30", "jid": "blocker"})
    env = server.ok("run", {"cmd": "echo queued", "jid": "queued"})
    assert env["d_ret"]["status"] == "notstarted" and env["d_ret"]["pid"] is None
    server.ok("run", {"cmd": "echo later", "jid": "later"})

    assert _cmd_status(server, "jid", "blocker") == {
        "0.start": {"jobRoot": "blocker", "startTrigger": [True]},
        "0.end": {"jobRoot": "blocker", "returncode": []},
        "l_status": ["started"]}
    assert _cmd_status(server, "jid", "queued") == {
        "0.start": {"jobRoot": "queued", "startTrigger": []},
        "0.end": {"jobRoot": "queued", "returncode": []},
        "l_status": ["notstarted"]}
    # the tree of a queued job: no start, no end
    status, reply = server.get("/api/v1/_1")      # the whole tree: _N without a path
    assert status == 200
    tree = reply["GET"]["queued"]
    assert tree["startInfo"] == {} and tree["endInfo"] == {}
    assert tree["start"] == {} and tree["end"] == {}
    status, reply = server.get("/api/v1/queued/startInfo/0")
    assert status == 404 and reply["status"] is False

    # kill a queued job: cancelled, it never started
    env = server.ok("kill", {"jid": "queued"})
    assert env["d_ret"]["status"] == "finishedWithError"
    assert "cancelled" in env["d_ret"]["message"]
    assert _cmd_status(server, "jid", "queued") == {
        "0.start": {"jobRoot": "queued", "startTrigger": [False]},
        "0.end": {"jobRoot": "queued", "returncode": [None]},
        "l_status": ["finishedWithError"]}

    # the blocker ends: the next queued job starts and finishes
    server.ok("kill", {"jid": "blocker"})
    assert _cmd_wait_finished(server, "blocker")["0.end"]["returncode"] == [-15]
    assert _cmd_wait_finished(server, "later") == {
        "0.start": {"jobRoot": "later", "startTrigger": [True]},
        "0.end": {"jobRoot": "later", "returncode": [0]},
        "l_status": ["finishedSuccessfully"]}


# ---------------------------------------------------------------------------
# 4. several hits
# ---------------------------------------------------------------------------

def test_cmd_status_several_hits(cmd_server):
    jids = ["p1-a", "p1-b", "p1-c"]
    for i, jid in enumerate(jids):
        cmd_server.ok("run", {"jid": jid, "cmd": "exit %d" % i, "project": "p1"})
    cmd_server.ok("run", {"jid": "p2-a", "cmd": "true", "project": "p2"})
    for jid in jids + ["p2-a"]:
        _cmd_wait_finished(cmd_server, jid)

    d_ret = _cmd_status(cmd_server, "project", "p1")
    expected = {}
    for i, jid in enumerate(jids):
        expected["%d.start" % i] = {"jobRoot": jid, "startTrigger": [True]}
        expected["%d.end" % i] = {"jobRoot": jid, "returncode": [i]}
    assert d_ret == dict(expected, l_status=["finishedSuccessfully", "finishedWithError",
                                             "finishedWithError"])
    assert list(d_ret) == ["0.start", "0.end", "1.start", "1.end", "2.start", "2.end",
                           "l_status"]

    env = cmd_server.ok("done", {"key": "project", "value": "p1"})
    assert env["d_ret"] == expected

    env = cmd_server.ok("info", {"key": "project", "value": "p1"})
    assert set(env["d_ret"]) == {"0.0", "0.1", "1.0", "1.1", "2.0", "2.1"}
    for i, jid in enumerate(jids):
        assert env["d_ret"]["%d.1" % i][jid]["endInfo"]["0"]["returncode"] == i
        assert env["d_ret"]["%d.0" % i][jid]["startInfo"]["0"]["jid"] == jid

    env = cmd_server.ok("search", {"key": "project", "value": "p1",
                                   "path": "/endInfo/0/returncode"})
    assert env["d_ret"] == {"0": {"p1-a": 0}, "1": {"p1-b": 1}, "2": {"p1-c": 2}}

    status, reply = cmd_server.get("/api/v1/p1-b/d_meta")
    assert status == 200
    assert json.loads(reply["GET"]["p1-b"]["d_meta"]) == {"project": "p1"}


# ---------------------------------------------------------------------------
# 5. no-hit replies
# ---------------------------------------------------------------------------

def test_cmd_no_hit_replies(cmd_server):
    cmd_server.ok("run", {"jid": "present", "cmd": "true"})
    _cmd_wait_finished(cmd_server, "present")
    cases = [
        ("status", {"key": "jid", "value": "nobody"}, dict(_CMD_NO_HIT, l_status=[])),
        ("status", {"key": "project", "value": "none"}, dict(_CMD_NO_HIT, l_status=[])),
        ("done", {"key": "jid", "value": "nobody"}, _CMD_NO_HIT),
        ("info", {"key": "jid", "value": "nobody"}, _CMD_NO_HIT),
        ("search", {"key": "jid", "value": "nobody"}, _CMD_NO_HIT),
        ("search", {"key": "jid", "value": "nobody", "job": "0", "when": "end",
                    "field": "stderr"}, _CMD_NO_HIT),
        # a hit whose path does not exist is no hit either
        ("search", {"key": "jid", "value": "present", "path": "/endInfo/7"}, _CMD_NO_HIT),
    ]
    for action, meta, d_ret in cases:
        status, env = cmd_server.cmd(action, meta)
        assert status == 200, (action, env)
        assert env == {"status": False, "action": action, "meta": meta,
                       "path": "/api/v1/cmd", "RESTverb": "POST", "d_ret": d_ret}, env


# ---------------------------------------------------------------------------
# 6. GET walks
# ---------------------------------------------------------------------------

def test_cmd_get_walks_deep_paths(cmd_server):
    jid = "walk-1"
    env = cmd_server.ok("run", {"jid": jid, "cmd": "echo w; exit 2", "auid": "u",
                                "project": "pw", "n": 3})
    pid = env["d_ret"]["pid"]
    _cmd_wait_finished(cmd_server, jid)

    status, reply = cmd_server.get("/api/v1/%s/end/0/endInfo/0/returncode" % jid)
    assert status == 200
    assert reply == {"status": True, "path": "/api/v1/%s/end/0/endInfo/0/returncode" % jid,
                     "GET": {jid: {"end": {"0": {"endInfo": {"0": {"returncode": 2}}}}}}}
    status, reply = cmd_server.get("/api/v1/%s/start/0/startInfo/0/pid/" % jid)
    assert status == 200
    assert reply["GET"] == {jid: {"start": {"0": {"startInfo": {"0": {"pid": pid}}}}}}
    status, reply = cmd_server.get("/api/v1/%s/d_meta" % jid)
    d_meta = reply["GET"][jid]["d_meta"]
    assert isinstance(d_meta, str) and json.loads(d_meta) == {"project": "pw", "n": 3}
    status, reply = cmd_server.get("/api/v1/%s/jobCount" % jid)
    assert reply["GET"] == {jid: {"jobCount": 1}}
    for field, value in (("jid", jid), ("cmd", "echo w; exit 2"), ("auid", "u")):
        status, reply = cmd_server.get("/api/v1/%s/%s" % (jid, field))
        assert status == 200 and reply["GET"] == {jid: {field: value}}

    # the whole tree under _0
    status, reply = cmd_server.get("/api/v1/_0")
    assert status == 200 and reply["status"] is True and list(reply["GET"]) == [jid]
    tree = reply["GET"][jid]
    for key in ("jid", "cmd", "auid", "d_meta", "jobCount", "startInfo", "endInfo",
                "start", "end"):
        assert key in tree, key
    info = tree["endInfo"]["0"]
    _cmd_check_info(info, jid=jid, cmd="echo w; exit 2", auid="u", pid=pid, returncode=2)
    assert tree["startInfo"]["0"] == info
    assert tree["start"] == {"0": {"startInfo": {"0": info}}}
    assert tree["end"] == {"0": {"endInfo": {"0": info}}}

    for path in ("/api/v1/%s/nope" % jid, "/api/v1/%s/endInfo/1" % jid,
                 "/api/v1/%s/endInfo/0/returncode/x" % jid, "/api/v1/%s/jid/x" % jid,
                 "/api/v1/nosuchjob/endInfo", "/api/v1/nosuchjob/"):
        status, reply = cmd_server.get(path)
        assert status == 404, (path, reply)
        assert reply["status"] is False and reply["message"], (path, reply)


def test_cmd_get_root_lists_jids_in_submission_order(cmd_server):
    for jid in ("zeta", "alpha", "mid"):
        cmd_server.ok("run", {"jid": jid, "cmd": "true"})
    for path in ("/api/v1/", "/api/v1"):
        status, reply = cmd_server.get(path)
        assert status == 200
        assert reply == {"status": True, "path": "/api/v1",
                         "GET": {"zeta": {}, "alpha": {}, "mid": {}},
                         "server_version": pman.__version__, "container_env": "local"}
        assert list(reply["GET"]) == ["zeta", "alpha", "mid"]


def test_cmd_index_out_of_range_404(cmd_server):
    status, reply = cmd_server.get("/api/v1/_0/endInfo")
    assert status == 404 and reply["status"] is False
    cmd_server.ok("run", {"jid": "only", "cmd": "true"})
    _cmd_wait_finished(cmd_server, "only")
    status, reply = cmd_server.get("/api/v1/_00/jid")
    assert status == 200 and reply["GET"] == {"only": {"jid": "only"}}
    for path in ("/api/v1/_1", "/api/v1/_1/endInfo", "/api/v1/_01/endInfo",
                 "/api/v1/_999999/endInfo/0/pid"):
        status, reply = cmd_server.get(path)
        assert status == 404, (path, reply)
        assert reply["status"] is False and reply["message"]


def test_cmd_get_action_matches_get_walk(cmd_server):
    cmd_server.ok("run", {"jid": "g1", "cmd": "echo g; echo e >&2"})
    _cmd_wait_finished(cmd_server, "g1")
    for path in ("/g1/endInfo", "/_0/endInfo/0/stderr", "/g1/start/0/startInfo/0/pid", "/_0"):
        env = cmd_server.ok("get", {"path": path})
        status, reply = cmd_server.get("/api/v1" + path)
        assert status == 200
        assert env["d_ret"] == reply["GET"], path
    # `get` of a bare jid is its whole tree (GET /api/v1/<jid> is the resource
    # dialect's job object, so the GET walk needs _N for that)
    env = cmd_server.ok("get", {"path": "/g1"})
    status, reply = cmd_server.get("/api/v1/_0")
    assert env["d_ret"] == reply["GET"] and list(env["d_ret"]) == ["g1"]
    env = cmd_server.ok("get", {"path": "/_0/endInfo/0/stderr"})
    assert env["d_ret"] == {"g1": {"endInfo": {"0": {"stderr": "e\n"}}}}
    for path in ("/g1/nope", "/nobody/endInfo", "/_5"):
        status, env = cmd_server.cmd("get", {"path": path})
        _cmd_check_error(status, env, 404, action="get")


# ---------------------------------------------------------------------------
# 7. reading only
# ---------------------------------------------------------------------------

def test_cmd_reads_never_modify_state(cmd_server):
    cmd_server.ok("run", {"jid": "r-done", "cmd": "echo done; exit 1", "project": "ro"})
    cmd_server.ok("run", {"jid": "r-run", "cmd": "sleep 30", "project": "ro"})
    _cmd_wait_finished(cmd_server, "r-done")
    _cmd_wait_quiet(cmd_server.manager)
    before_files = _cmd_snapshot(cmd_server.state_dir)
    before_jobs = cmd_server.manager.jobs()
    before_jids = cmd_server.manager.jids()

    gets = ["/api/v1/", "/api/v1/r-done/endInfo", "/api/v1/r-run/startInfo/0/pid",
            "/api/v1/_0", "/api/v1/_1/end", "/api/v1/_9/endInfo", "/api/v1/r-done/nope",
            "/api/v1/ghost/endInfo", "/api/v1/r-done/end/0/endInfo/0/stdout",
            "/api/v1/r-done/d_meta"]
    for path in gets:
        status, _ = cmd_server.get(path)
        assert status in (200, 404), path
    for meta in ({"path": "/r-done/endInfo"}, {"path": "/_1/startInfo"},
                 {"path": "/ghost/endInfo"}, {"path": "/r-done/zzz"}):
        status, _ = cmd_server.cmd("get", meta)
        assert status in (200, 404)
    for action, meta in (("search", {"key": "project", "value": "ro"}),
                         ("search", {"key": "jid", "value": "r-done", "job": "0",
                                     "when": "end", "field": "stdout"}),
                         ("search", {"key": "jid", "value": "ghost"}),
                         ("search", {"key": "project", "value": "ro", "path": "/nope"}),
                         ("status", {"key": "project", "value": "ro"}),
                         ("done", {"key": "jid", "value": "ghost"}),
                         ("info", {"key": "project", "value": "ro"})):
        status, _ = cmd_server.cmd(action, meta)
        assert status == 200, (action, meta)

    assert _cmd_snapshot(cmd_server.state_dir) == before_files
    assert cmd_server.manager.jobs() == before_jobs
    assert cmd_server.manager.jids() == before_jids


# ---------------------------------------------------------------------------
# 8. bad requests, and the unwrapped payload
# ---------------------------------------------------------------------------

def test_cmd_bad_requests_are_json_400_on_a_kept_connection(cmd_server):
    cmd_server.ok("run", {"jid": "bad-target", "cmd": "sleep 30"})
    conn = cmd_server.connect()
    try:
        cases = [
            ({"payload": {"action": "frobnicate", "meta": {}}}, "frobnicate"),
            ({"payload": {"meta": {"key": "jid", "value": "x"}}}, None),
            ({"payload": {"action": "status", "meta": "x"}}, "status"),
            ({"payload": {"action": "status", "meta": [1, 2]}}, "status"),
            ({"payload": {"action": "status", "meta": None}}, "status"),
            ({"payload": {"action": "status"}}, "status"),
            ({"payload": {"action": "status", "meta": {"key": 3, "value": "x"}}}, "status"),
            ({"payload": {"action": "run", "meta": {"jid": "nocmd"}}}, "run"),
            ({"payload": {"action": "run", "meta": {"jid": "x1", "cmd": 5}}}, "run"),
            ({"payload": {"action": "run", "meta": {"cmd": "true", "auid": 7}}}, "run"),
            ({"payload": {"action": "run", "meta": {"cmd": "true", "jid": 7}}}, "run"),
            ({"payload": {"action": "run", "meta": {"cmd": "true", "jid": "a/b"}}}, "run"),
            ({"payload": {"action": "search", "meta": {"key": "jid", "value": "bad-target",
                                                         "when": "middle"}}}, "search"),
            ({"payload": {"action": "search", "meta": {"key": "jid", "value": "bad-target",
                                                         "path": 5}}}, "search"),
            ({"payload": {"action": "get", "meta": {}}}, "get"),
            ({"payload": {"action": "get", "meta": {"path": "/"}}}, "get"),
            ({"payload": {"action": "hello", "meta": {"askAbout": "weather"}}}, "hello"),
            ({"payload": {"action": "hello", "meta": {"askAbout": "echoBack",
                                                        "echoBack": 5}}}, "hello"),
            ({"payload": {"action": "DBctl", "meta": {"do": "drop"}}}, "DBctl"),
            ({"payload": {"action": "kill", "meta": {"jid": "bad-target",
                                                       "signal": "SIGNOPE"}}}, "kill"),
            ({"payload": {"action": "kill", "meta": {"jid": "bad-target",
                                                       "grace": "soon"}}}, "kill"),
            ({"payload": "run"}, None),
        ]
        sock = None
        for body, action in cases:
            status, obj = cmd_server.request("POST", "/api/v1/cmd/", body, conn=conn)
            _cmd_check_error(status, obj, 400, action=action)
            assert "receivedByServer" not in obj
            sock = sock or conn.sock
            assert conn.sock is sock, "the connection was dropped after %r" % (body,)
        for raw in ("[1, 2]", "{not json", "\"payload\""):
            status, obj = cmd_server.request("POST", "/api/v1/cmd/", raw=raw, conn=conn)
            _cmd_check_error(status, obj, 400)
            assert conn.sock is sock
        # and the same connection still serves a good request
        status, obj = cmd_server.request("POST", "/api/v1/cmd/",
                                         {"payload": {"action": "hello",
                                                      "meta": {"askAbout": "echoBack",
                                                               "echoBack": "still"}}},
                                         conn=conn)
        assert status == 200 and obj["d_ret"] == {"echoBack": {"msg": "still"}}
        assert conn.sock is sock
    finally:
        conn.close()
    # nothing was run by the bad requests
    assert cmd_server.manager.jids() == ["bad-target"]
    assert _cmd_status(cmd_server, "jid", "bad-target")["l_status"] == ["started"]


def test_cmd_kill_and_delete_without_a_jid_are_400(cmd_server):
    cmd_server.ok("run", {"jid": "kd-target", "cmd": "sleep 30"})
    for action, meta in (("kill", {}), ("kill", {"jid": 5}), ("kill", {"jid": ["kd-target"]}),
                         ("delete", {}), ("delete", {"value": 5}),
                         ("delete", {"jid": {"x": 1}})):
        status, obj = cmd_server.cmd(action, meta)
        _cmd_check_error(status, obj, 400, action=action)
    assert _cmd_status(cmd_server, "jid", "kd-target")["l_status"] == ["started"]


def test_cmd_unwrapped_payload_accepted(cmd_server):
    env_status, env = cmd_server.cmd("run", {"jid": "bare", "cmd": "echo bare"}, wrap=False)
    assert env_status == 200
    _cmd_check_envelope(env, "run", {"jid": "bare", "cmd": "echo bare"},
                        extra=("jobRootDir",))
    assert env["status"] is True and env["jobRootDir"] == "bare"
    # exec.cmd without the wrapper too
    status, env = cmd_server.request("POST", "/api/v1/cmd", {
        "exec": {"cmd": "echo bare2"}, "action": "run", "meta": {"jid": "bare2"}})
    assert status == 200 and env["d_ret"]["cmd"] == "echo bare2"
    _cmd_wait_finished(cmd_server, "bare")
    status, env = cmd_server.cmd("status", {"key": "jid", "value": "bare"}, wrap=False)
    assert status == 200 and env["status"] is True
    assert env["d_ret"]["0.end"] == {"jobRoot": "bare", "returncode": [0]}


# ---------------------------------------------------------------------------
# 9. the tree is a projection
# ---------------------------------------------------------------------------

def test_cmd_rerun_same_jid_tree_is_fresh(cmd_server):
    jid = "again"
    first = cmd_server.ok("run", {"jid": jid, "cmd": "echo one; exit 3", "round": 1})
    _cmd_wait_finished(cmd_server, jid)
    cmd_server.ok("run", {"jid": "other", "cmd": "true"})
    status, reply = cmd_server.get("/api/v1/%s/endInfo/0" % jid)
    old = reply["GET"][jid]["endInfo"]["0"]
    assert old["returncode"] == 3 and old["pid"] == first["d_ret"]["pid"]

    second = cmd_server.ok("run", {"jid": jid, "cmd": "echo two; exit 5", "round": 2})
    pid2 = second["d_ret"]["pid"]
    assert pid2 != first["d_ret"]["pid"]
    d_ret = _cmd_wait_finished(cmd_server, jid)
    assert d_ret["0.end"] == {"jobRoot": jid, "returncode": [5]}
    assert list(d_ret) == ["0.start", "0.end", "l_status"]     # one job, not two

    status, reply = cmd_server.get("/api/v1/_1")   # the re-run is now the second job
    assert status == 200
    tree = reply["GET"][jid]
    assert tree["cmd"] == "echo two; exit 5"
    assert json.loads(tree["d_meta"]) == {"round": 2}
    assert tree["jobCount"] == 1
    for info in (tree["startInfo"]["0"], tree["endInfo"]["0"]):
        _cmd_check_info(info, jid=jid, cmd="echo two; exit 5", auid="", pid=pid2,
                        returncode=5)
        assert info["stdout"] == "two\n"
    # the re-run moved to the end of the submission order
    status, reply = cmd_server.get("/api/v1/")
    assert list(reply["GET"]) == ["other", jid]
    status, reply = cmd_server.get("/api/v1/_1/endInfo/0/pid")
    assert reply["GET"] == {jid: {"endInfo": {"0": {"pid": pid2}}}}
    env = cmd_server.ok("info", {"key": "jid", "value": jid})
    assert env["d_ret"]["0.1"][jid]["endInfo"]["0"]["returncode"] == 5


def test_cmd_rerun_cancelled_before_start_shows_no_stale_output(cmd_factory):
    """A finished jid re-run while all slots are busy is queued; cancelled
    before it starts, its tree must not show the previous run's output."""
    server = cmd_factory(max_running=1)
    server.ok("run", {"jid": "stale", "cmd": "echo OLD-OUTPUT; echo OLD-ERR >&2"})
    _cmd_wait_finished(server, "stale")
    server.ok("run", {"jid": "hog", "cmd": "sleep 30"})
    env = server.ok("run", {"jid": "stale", "cmd": "echo NEW"})
    assert env["d_ret"]["status"] == "notstarted"
    server.ok("kill", {"jid": "stale"})
    d_ret = _cmd_status(server, "jid", "stale")
    assert d_ret["0.start"] == {"jobRoot": "stale", "startTrigger": [False]}
    status, reply = server.get("/api/v1/stale/endInfo/0")
    assert status == 200
    info = reply["GET"]["stale"]["endInfo"]["0"]
    assert info["cmd"] == "echo NEW" and info["pid"] is None
    assert "OLD-OUTPUT" not in info["stdout"], info
    assert "OLD-ERR" not in info["stderr"], info
