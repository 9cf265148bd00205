#!/usr/bin/env python3
"""Benchmark for pman (standard library only, Python 3.9+, Linux).

Usage::

    python3 bench_pman.py                  # every section, full sizes
    python3 bench_pman.py --quick          # reduced sizes, < 30 s (CI)
    python3 bench_pman.py --json           # the results as JSON on stdout
    python3 bench_pman.py --section spawn --section latency
    python3 bench_pman.py --profile        # cProfile of main + reaper threads
    python3 bench_pman.py --dir /var/tmp   # where the state directories go
    python3 bench_pman.py --scale-logs     # scale: also 2 empty logs per job

The output is a table ``figure | measured | target | ok/MISS``; figures
without a target are information.  ``--json`` prints a dict of sections ->
{figure: {"value", "unit", "target", "ok", "note"}}; the pseudo-section
``machine`` describes the host.  Missed targets never change the exit status
(CI runs ``--quick`` only to check that the benchmark still runs); a section
that crashes does (exit status 1).

Sections (see SECTIONS at the bottom to add one, e.g. "http"):

spawn        2,000 ``true`` jobs through JobManager vs raw Popen bursts
             (--quick: 100)
latency      submit -> started and exit -> status visible, p50/p99, with
             100 running jobs (--quick: 30), plus a no-pman pidfd baseline
scale        100,000 finished jobs in state (--quick: 5,000), written as a
             snapshot rather than run: startup, RSS, run(), get()
concurrency  1,000 concurrent ``sleep 2`` jobs (--quick: 200 x sleep 0.5):
             codes, threads, fds, wall time

Wall-clock figures depend on everything else the machine does: the table
prints the load average before and after; compare runs only on a quiet
machine, and prefer the ratios (each measured against a baseline
interleaved with it in the same process).

Every section gets a fresh ``tempfile.mkdtemp`` directory (under ``--dir``
if given: the file system matters, since pman fsyncs), closes its managers
with ``kill=True`` and removes the directory.
"""

import argparse
import collections
import cProfile
import io
import json
import os
import platform
import pstats
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import pman  # noqa: E402

perf = time.perf_counter
LOG_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC   # as pman opens logs


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------

def progress(msg):
    sys.stderr.write("  .. %s\n" % msg)
    sys.stderr.flush()


def percentile(values, p):
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, int(-(-p * len(ordered) // 100)))     # ceil(p/100 * n)
    return ordered[min(rank, len(ordered)) - 1]


def fd_count():
    return len(os.listdir("/proc/self/fd")) - 1     # minus listdir's own fd


def vm_field(name):
    """A /proc/self/status field in MB (VmRSS, VmHWM...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def dir_size(path):
    """(apparent bytes, allocated bytes, files) of a directory tree."""
    apparent = allocated = files = 0
    for root, dirs, names in os.walk(path):
        for name in dirs + names:
            st = os.lstat(os.path.join(root, name))
            apparent += st.st_size
            allocated += st.st_blocks * 512
            files += name in names
    return apparent, allocated, files


def fs_type(path):
    """The file system type of *path*, from /proc/self/mounts."""
    path = os.path.realpath(path)
    best, kind = "", "?"
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1].replace("\\040", " ")
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind


def iso(ts):
    return datetime.fromtimestamp(ts, timezone.utc).isoformat()


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------

class Bench:
    """What a section function receives: sizes (``quick``), temporary
    directories and managers that are cleaned up after the section, and
    ``figure()`` to report a result."""

    def __init__(self, quick, base_dir, scale_logs=False):
        self.quick = quick
        self.scale_logs = scale_logs
        self.base_dir = base_dir
        self.results = collections.OrderedDict()
        self.section = None
        self._dirs = []
        self._managers = []

    # -- reporting --------------------------------------------------------

    def figure(self, name, value, unit="", target=None, note=""):
        """Record one figure.  *target* is None (information only) or
        (op, bound) with op ">=" or "<="."""
        ok = None
        if target is not None:
            op, bound = target
            if not isinstance(value, (int, float)) or value != value:
                ok = False
            elif op == ">=":
                ok = value >= bound
            elif op == "<=":
                ok = value <= bound
            else:
                raise ValueError("bad target operator %r" % op)
        entry = {"value": value, "unit": unit,
                 "target": None if target is None else "%s %g" % (target[0], target[1]),
                 "ok": ok}
        if note:
            entry["note"] = note
        self.results.setdefault(self.section, collections.OrderedDict())[name] = entry
        progress("%-44s %s %s%s" % (name, _fmt(value), unit,
                                    "" if ok is None else ("  ok" if ok else "  MISS")))

    # -- resources ----------------------------------------------------------

    def state_dir(self, name="state"):
        """A fresh directory for this section, removed after it."""
        path = tempfile.mkdtemp(prefix="pman-bench-%s-%s-" % (self.section, name),
                                dir=self.base_dir)
        self._dirs.append(path)
        return path

    def manager(self, path, **options):
        """A JobManager that is closed with kill=True after the section."""
        m = pman.JobManager(path, **options)
        self._managers.append(m)
        return m

    def cleanup(self):
        for m in self._managers:
            try:
                m.close(kill=True)      # a no-op if the section closed it
            except Exception:
                traceback.print_exc()
        for path in self._dirs:
            shutil.rmtree(path, ignore_errors=True)
        self._managers, self._dirs = [], []


def _fmt(value):
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if value != value:
        return "nan"
    a = abs(value)
    if a >= 100:
        return "%.0f" % value
    if a >= 10:
        return "%.1f" % value
    if a >= 1:
        return "%.2f" % value
    return "%.3g" % value


# ---------------------------------------------------------------------------
# Section: spawn
# ---------------------------------------------------------------------------

def _raw_burst(n, logs, wrapper):
    """Spawn *n* jobs with raw Popen, as pman would open their logs, then
    wait for all; return the elapsed seconds.  wrapper=False: the plain
    ``Popen("true", shell=True)`` baseline; True: pman's exact Popen call
    (its wrapper shell, stdin=DEVNULL) without the manager around it."""
    procs = []
    c0 = time.process_time()
    t0 = perf()
    for i in range(n):
        out = os.open(os.path.join(logs, "%d.out" % i), LOG_FLAGS, 0o600)
        err = os.open(os.path.join(logs, "%d.err" % i), LOG_FLAGS, 0o600)
        try:
            if wrapper:
                args = ["/bin/sh", "-c", pman._WRAP_SHELL, "pman-job",
                        os.path.join(logs, "%d.rc" % i), "true"]
                procs.append(subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out,
                                              stderr=err, start_new_session=True))
            else:
                procs.append(subprocess.Popen("true", shell=True, stdout=out, stderr=err,
                                              start_new_session=True))
        finally:
            os.close(out)
            os.close(err)
    for p in procs:
        p.wait()
    elapsed = perf() - t0
    cpu = time.process_time() - c0
    bad = sum(p.returncode != 0 for p in procs)
    if bad:
        raise RuntimeError("%d raw jobs failed" % bad)
    return elapsed, cpu


def _pman_burst(b, n, durable):
    """(seconds from the first run() to all reaped, seconds of the run()
    loop, CPU seconds of this process, all threads) for *n* ``true`` jobs
    on a fresh manager."""
    path = b.state_dir("spawn-pman")
    m = b.manager(path, durable=durable)
    try:
        c0 = time.process_time()
        t0 = perf()
        jids = [m.run("true")["jid"] for _ in range(n)]
        t_sub = perf()
        records = m.wait(jids, timeout=60 + n * 0.1)
        elapsed = perf() - t0
        cpu = time.process_time() - c0
    finally:
        m.close(kill=True)
        shutil.rmtree(path, ignore_errors=True)
    bad = sum(r["status"] != pman.SUCCESS for r in records)
    if bad:
        raise RuntimeError("%d pman jobs did not finish successfully" % bad)
    return elapsed, t_sub - t0, cpu


def sec_spawn(b):
    n = 100 if b.quick else 2000
    rounds = 2 if b.quick else 3
    best = collections.defaultdict(lambda: float("inf"))
    for r in range(rounds):
        # Interleaved so that drift in machine load hits every variant alike.
        for variant in ("raw", "wrapper", "pman", "pman-nondurable"):
            if variant in ("raw", "wrapper"):
                logs = b.state_dir("spawn-raw")
                try:
                    dt, cpu = _raw_burst(n, logs, wrapper=variant == "wrapper")
                finally:
                    shutil.rmtree(logs, ignore_errors=True)
            else:
                dt, sub, cpu = _pman_burst(b, n, durable=variant == "pman")
                best[variant + "-submit"] = min(best[variant + "-submit"], sub)
            best[variant] = min(best[variant], dt)
            best[variant + "-cpu"] = min(best[variant + "-cpu"], cpu)
            progress("round %d/%d %-16s %6.0f jobs/s" % (r + 1, rounds, variant, n / dt))
    rate = {k: n / v for k, v in best.items() if not k.endswith("-cpu")}
    b.figure("jobs per burst", n, "jobs", note="best of %d interleaved rounds each" % rounds)
    b.figure("raw Popen(shell=True) rate", rate["raw"], "jobs/s",
             note="baseline: Popen('true', shell=True), 2 log files, new session")
    b.figure("raw Popen of pman's wrapper rate", rate["wrapper"], "jobs/s",
             note="pman's exact Popen call (wrapper shell, stdin=DEVNULL), no manager")
    b.figure("pman rate (durable)", rate["pman"], "jobs/s",
             note="first run() until wait() sees all reaped")
    b.figure("pman/raw ratio (durable)", rate["pman"] / rate["raw"], "x", (">=", 0.6),
             note="issue 7 wants >= 0.6; issue 2 said >= 0.5")
    b.figure("pman run() loop rate (durable)", n / best["pman-submit"], "jobs/s",
             note="the run() calls only, reaping overlaps")
    b.figure("pman rate (durable=False)", rate["pman-nondurable"], "jobs/s")
    b.figure("pman run() loop rate (durable=False)", n / best["pman-nondurable-submit"],
             "jobs/s")
    b.figure("pman/raw ratio (durable=False)", rate["pman-nondurable"] / rate["raw"], "x")
    b.figure("wrapper cost per job", (best["wrapper"] - best["raw"]) / n * 1e6, "us",
             note="raw wrapper Popen minus raw baseline")
    b.figure("manager overhead per job (durable)", (best["pman"] - best["wrapper"]) / n * 1e6,
             "us", note="pman minus raw wrapper Popen")
    b.figure("manager overhead per job (durable=False)",
             (best["pman-nondurable"] - best["wrapper"]) / n * 1e6, "us")
    # CPU time of this process (all its threads, not the children) is far
    # less sensitive than wall time to other load on the machine.
    for variant, label in (("raw", "raw Popen(shell=True)"), ("wrapper", "raw wrapper Popen"),
                           ("pman", "pman (durable)"), ("pman-nondurable", "pman (durable=False)")):
        b.figure("parent CPU per job, %s" % label, best[variant + "-cpu"] / n * 1e6, "us",
                 note="time.process_time() of this process (all threads, not the children), best round"
                 if variant == "raw" else "")
    b.figure("parent CPU ratio pman/raw (durable)", best["pman-cpu"] / best["raw-cpu"], "x")


# ---------------------------------------------------------------------------
# Section: latency
# ---------------------------------------------------------------------------

def _wait_for(predicate, timeout, what):
    deadline = perf() + timeout
    while not predicate():
        if perf() > deadline:
            raise RuntimeError("timed out waiting for %s" % what)
        time.sleep(0.005)


def _raw_exit_latency(n, step, lead, marks, tag):
    """The same jobs as pman's (same wrapper), spawned with raw Popen and
    watched with pidfds + epoll on this thread: exit -> pidfd readable, the
    floor that the OS and the job's own teardown put under pman's figure.
    None where pidfds are missing."""
    import selectors
    if not hasattr(os, "pidfd_open"):
        return None
    sel = selectors.DefaultSelector()
    procs, seen = [], {}
    t0 = time.time() + lead
    try:
        for i in range(n):
            mark = os.path.join(marks, "%s-%d" % (tag, i))
            cmd = "sleep %.4f; date +%%s.%%N >%s" % (
                max(0.0, t0 + i * step - time.time()), shlex.quote(mark))
            p = subprocess.Popen(["/bin/sh", "-c", pman._WRAP_SHELL, "pman-job",
                                  mark + ".rc", cmd], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
            procs.append((p, mark))
            sel.register(os.pidfd_open(p.pid), selectors.EVENT_READ, i)
        deadline = perf() + lead + n * step + 60
        while len(seen) < n and perf() < deadline:
            for key, _ in sel.select(1.0):
                seen[key.data] = time.time()
                sel.unregister(key.fd)
                os.close(key.fd)
    finally:
        for key in list(sel.get_map().values()):
            os.close(key.fd)
        sel.close()
        for p, _ in procs:
            p.wait()
    lat = []
    for i, (p, mark) in enumerate(procs):
        with open(mark) as f:
            lat.append(seen[i] - float(f.read()))
    return lat


def sec_latency(b):
    n = 30 if b.quick else 100
    chain = 20 if b.quick else 100
    top = b.state_dir("latency")
    marks = os.path.join(top, "marks")
    os.mkdir(marks)
    ended = {}

    def on_end(record):         # runs on the reaper thread
        ended[record["jid"]] = time.time()

    m = b.manager(os.path.join(top, "state"), on_end=on_end)
    # Warm up, and size the lead time so that every job is submitted before
    # the first one exits (so the exits are measured with n jobs running).
    t = perf()
    warm = [m.run("true", jid="warm-%d" % i)["jid"] for i in range(10)]
    per_run = (perf() - t) / 10
    m.wait(warm, timeout=30)
    lead = 0.5 + n * max(0.01, 4 * per_run)

    run_lat = []
    for variant, step in (("staggered", 0.005), ("burst", 0.0)):
        # Each job sleeps until its own exit instant (T0 + i*step), writes
        # the time just before it ends, and on_end records when pman saw it.
        t0 = time.time() + lead
        jids = []
        for i in range(n):
            jid = "%s-%d" % (variant, i)
            mark = os.path.join(marks, jid)
            cmd = "sleep %.4f; date +%%s.%%N >%s" % (
                max(0.0, t0 + i * step - time.time()), shlex.quote(mark))
            s = perf()
            m.run(cmd, jid=jid)
            run_lat.append(perf() - s)
            jids.append(jid)
        overran = time.time() - t0
        records = m.wait(jids, timeout=lead + n * step + 60)
        _wait_for(lambda: all(j in ended for j in jids), 30, "on_end callbacks")
        bad = [r["jid"] for r in records if r["status"] != pman.SUCCESS]
        if bad:
            raise RuntimeError("latency jobs failed: %s" % bad[:5])
        lat = []
        for jid in jids:
            with open(os.path.join(marks, jid)) as f:
                lat.append(ended[jid] - float(f.read()))
        note = ("%d running jobs, exits %g ms apart" % (n, step * 1e3) if step else
                "%d running jobs all exiting at once: p99 is the batch's tail" % n)
        if overran > 0:
            note += "; WARNING submissions overran the first exit by %.0f ms" % (overran * 1e3)
        target = (("<=", 10.0) if step else None)
        b.figure("exit -> on_end p50 (%s)" % variant, percentile(lat, 50) * 1e3, "ms", note=note)
        b.figure("exit -> on_end p99 (%s)" % variant, percentile(lat, 99) * 1e3, "ms", target,
                 note="upper bound: includes the job's own teardown after `date`")
        b.figure("exit -> on_end max (%s)" % variant, max(lat) * 1e3, "ms")
        raw = _raw_exit_latency(n, step, lead, marks, "raw-" + variant)
        if raw is not None:
            b.figure("raw pidfd baseline p50 (%s)" % variant, percentile(raw, 50) * 1e3, "ms",
                     note="no pman: same jobs via raw Popen, one thread epolls their "
                          "pidfds; exit -> pidfd readable")
            b.figure("raw pidfd baseline p99 (%s)" % variant, percentile(raw, 99) * 1e3, "ms")

    b.figure("run() return p50 (not queued)", percentile(run_lat, 50) * 1e3, "ms",
             note="%d durable submissions while up to %d jobs run" % (len(run_lat), n))
    b.figure("run() return p99 (not queued)", percentile(run_lat, 99) * 1e3, "ms", ("<=", 10.0))
    m.close(kill=True)

    # Queued jobs: with max_running=1 a chain of jobs each writes its exit
    # time; the next job's `started` minus that time is the slot hand-off
    # (exit -> reaper -> spawn of the next queued job).  run() -> started
    # for a queued job would mostly measure the queue's length.
    q = b.manager(os.path.join(top, "queued"), max_running=1)
    jids = []
    for i in range(chain):
        mark = os.path.join(marks, "q-%d" % i)
        cmd = "%sdate +%%s.%%N >%s" % ("sleep 0.5; " if i == 0 else "", shlex.quote(mark))
        jids.append(q.run(cmd, jid="q-%d" % i)["jid"])
    records = q.wait(jids, timeout=60 + chain)
    handoff = []
    for i in range(1, chain):
        with open(os.path.join(marks, "q-%d" % (i - 1))) as f:
            prev_exit = float(f.read())
        handoff.append(pman._parse_time(records[i]["started"]) - prev_exit)
    q.close(kill=True)
    b.figure("queued: exit -> next started p50", percentile(handoff, 50) * 1e3, "ms",
             note="max_running=1, chain of %d jobs" % chain)
    b.figure("queued: exit -> next started p99", percentile(handoff, 99) * 1e3, "ms", ("<=", 10.0))


# ---------------------------------------------------------------------------
# Section: scale
# ---------------------------------------------------------------------------

def build_state(path, n, logs=True):
    """Write a state directory holding *n* finished jobs the way pman
    persists them: a snapshot header, then one ``_Job(...).line()`` per job.
    No process is run.  With *logs*, each job gets its (empty) .out/.err."""
    os.makedirs(os.path.join(path, "logs"), mode=0o700, exist_ok=True)
    base = time.time() - n * 2.0
    boot = getattr(pman, "_BOOT_ID", "")
    extras = {"number_of_workers": "1", "cpu_limit": "1000", "memory_limit": "200",
              "gpu_limit": "0", "image": "fnndsc/pl-simpledsapp", "type": "fs"}
    snap = os.path.join(path, getattr(pman, "SNAPSHOT", "state.jsonl"))
    with open(snap, "w", encoding="utf-8") as f:
        f.write(json.dumps({"pman_state": getattr(pman, "STATE_FORMAT", 1), "generation": 1,
                            "next_seq": n + 1, "written": iso(time.time()),
                            "pman_version": pman.__version__}) + "\n")
        for i in range(1, n + 1):
            t = base + 2.0 * i
            jid = "job-%d-4242" % i
            job = pman._Job(
                jid=jid, status=pman.SUCCESS, seq=i, message="exited with code 0",
                returncode=0, pid=1000 + i % 4000000,
                cmd="python3 /usr/local/bin/simpledsapp --saveinputmeta /share/%d/in "
                    "/share/%d/out" % (i, i),
                argv=None, auid="chris", meta={"feed": "feed-%d" % (i % 500)}, env=None,
                cwd=None, timeout=None, extras=extras, submitted=iso(t),
                started=iso(t + 0.004), ended=iso(t + 1.5),
                ident=[int(t * 100) % 10 ** 9, boot], kill_signal=None, kill_reason=None)
            f.write(job.line() + "\n")
            if logs:
                for ext in (".out", ".err"):
                    os.close(os.open(os.path.join(path, "logs", jid + ext), LOG_FLAGS, 0o600))
        f.flush()
        os.fsync(f.fileno())


_PROBE = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
def vm(name):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1]) / 1024.0
import pman
rss0 = vm("VmRSS")
t0 = time.perf_counter()
m = pman.JobManager(sys.argv[2])
t1 = time.perf_counter()
rss1 = vm("VmRSS")
jobs = sum(m.counts().values())
t2 = time.perf_counter()
m.close()
t3 = time.perf_counter()
print(json.dumps({"startup": t1 - t0, "close": t3 - t2, "rss0": rss0, "rss1": rss1,
                  "hwm": vm("VmHWM"), "jobs": jobs}))
"""


def _probe(path):
    out = subprocess.run([sys.executable, "-c", _PROBE, HERE, path], check=True,
                         stdout=subprocess.PIPE, universal_newlines=True, timeout=300).stdout
    return json.loads(out.strip().splitlines()[-1])


def _run_burst(m, k):
    """(run() loop seconds, first run() to all reaped seconds) for k jobs."""
    t0 = perf()
    jids = [m.run("true")["jid"] for _ in range(k)]
    t1 = perf()
    m.wait(jids, timeout=60 + k * 0.1)
    return t1 - t0, perf() - t0


def sec_scale(b):
    n = 5000 if b.quick else 100000
    logs = b.scale_logs
    k = 30 if b.quick else 300              # run() burst size
    gets = 2000 if b.quick else 20000
    rounds = 2 if b.quick else 3
    n_probes = 1 if b.quick else 3
    big = b.state_dir("big")
    small = b.state_dir("small")
    empty = b.state_dir("empty")
    t = perf()
    build_state(big, n, logs=logs)
    build_state(small, 10, logs=logs)
    b.figure("finished jobs in state", n, "jobs",
             note="synthetic history written as a snapshot with _Job(...).line() "
                  "(no processes run); %s" % (
                      "2 empty log files per job" if logs else
                      "no log files (--scale-logs creates 2 empty ones per job)"))
    b.figure("time to build the synthetic state", perf() - t, "s")

    probes = [_probe(big) for _ in range(n_probes)]
    if any(p["jobs"] != n for p in probes):
        raise RuntimeError("the manager loaded %s jobs, expected %d" % (
            [p["jobs"] for p in probes], n))
    mid = len(probes) // 2
    startup = sorted(p["startup"] for p in probes)[mid]
    growth = sorted(p["rss1"] - p["rss0"] for p in probes)[mid]
    empty_probe = _probe(empty)
    b.figure("startup JobManager(dir)", startup, "s", ("<=", 1.0),
             note="median of %d fresh subprocess(es), warm page cache; issue 4 said <= 3 s"
             % len(probes))
    b.figure("startup on an empty state", empty_probe["startup"], "s")
    b.figure("RSS growth from loading", growth, "MB", ("<=", 150.0),
             note="VmRSS after JobManager() minus before, fresh subprocess")
    b.figure("VmHWM of that subprocess", sorted(p["hwm"] for p in probes)[mid], "MB",
             note="peak RSS incl. close()'s compaction")
    b.figure("close() with the history", sorted(p["close"] for p in probes)[mid], "s",
             note="writes a fresh snapshot of every job")
    apparent, allocated, files = dir_size(big)
    b.figure("state directory size", apparent / 1e6, "MB",
             note="apparent bytes; %.1f MB allocated, %d files%s" % (
                 allocated / 1e6, files, "" if logs else ", without the jobs' log files"))
    snap_size = os.path.getsize(os.path.join(big, getattr(pman, "SNAPSHOT", "state.jsonl")))
    b.figure("snapshot bytes per job", snap_size / float(n), "B")

    m_big = b.manager(big)
    m_small = b.manager(small)
    m_empty = b.manager(empty)

    # run() throughput, big vs empty, interleaved, best of each.
    best = collections.defaultdict(lambda: float("inf"))
    for r in range(rounds):
        for name, m in (("empty", m_empty), ("big", m_big)):
            sub, full = _run_burst(m, k)
            best[name] = min(best[name], sub)
            best[name + "-full"] = min(best[name + "-full"], full)
    b.figure("run() rate, empty state", k / best["empty"], "jobs/s",
             note="%d durable `true` runs, best of %d" % (k, rounds))
    b.figure("run() rate, %d-job state" % n, k / best["big"], "jobs/s")
    b.figure("run() rate ratio big/empty", best["empty"] / best["big"], "x", (">=", 0.9))
    b.figure("run..reaped rate ratio big/empty", best["empty-full"] / best["big-full"], "x",
             note="first run() to all reaped")

    # get() of one job, big vs 10-job state.
    jid_big = "job-%d-4242" % (n // 2)
    jid_small = "job-5-4242"
    best = collections.defaultdict(lambda: float("inf"))
    for r in range(rounds):
        for name, m, jid in (("small", m_small, jid_small), ("big", m_big, jid_big)):
            t0 = perf()
            for _ in range(gets):
                m.get(jid)
            best[name] = min(best[name], (perf() - t0) / gets)
    b.figure("get() latency, 10-job state", best["small"] * 1e6, "us")
    b.figure("get() latency, %d-job state" % n, best["big"] * 1e6, "us")
    b.figure("get() latency ratio big/small", best["big"] / best["small"], "x", ("<=", 1.5))

    # Information: the calls that walk the whole history.
    for label, call in (("counts()", lambda: m_big.counts()),
                        ("jobs(limit=100)", lambda: m_big.jobs(limit=100)),
                        ("jobs(status='started')", lambda: m_big.jobs(status="started")),
                        ("jobs() full listing", lambda: m_big.jobs())):
        t0 = perf()
        call()
        b.figure("%s with the history" % label, (perf() - t0) * 1e3, "ms")


# ---------------------------------------------------------------------------
# Section: concurrency
# ---------------------------------------------------------------------------

def sec_concurrency(b):
    n, sleep = (200, 0.5) if b.quick else (1000, 2)
    path = b.state_dir("concurrency")
    fd0 = fd_count()
    threads0 = threading.active_count()
    m = b.manager(path)
    max_threads = threading.active_count()
    t0 = perf()
    jids = []
    for i in range(n):
        jids.append(m.run("sleep %s; exit $((%d %% 5))" % (sleep, i), jid="c-%d" % i)["jid"])
        if i % 50 == 0:
            max_threads = max(max_threads, threading.active_count())
    t_sub = perf() - t0
    fds_end_of_loop = fd_count()
    while True:
        max_threads = max(max_threads, threading.active_count())
        try:
            records = m.wait(jids, timeout=0.25)
            break
        except pman.Timeout:
            if perf() - t0 > sleep + 120:
                raise
    wall = perf() - t0
    m.close(kill=True)
    fd1 = fd_count()
    correct = 0
    for i, r in enumerate(records):
        code = i % 5
        if r["returncode"] == code and r["status"] == (pman.SUCCESS if code == 0 else pman.ERROR):
            correct += 1
    b.figure("jobs", n, "jobs", note="`sleep %s; exit $((i %% 5))`" % sleep)
    b.figure("reaped with the right code", correct, "jobs", (">=", n))
    b.figure("threads while running (max)", max_threads, "threads", ("<=", 8),
             note="threading.active_count(), main thread included; %d before" % threads0)
    b.figure("fds after close minus before", fd1 - fd0, "fds", ("<=", 0))
    b.figure("fds at the end of the run() loop", fds_end_of_loop - fd0, "fds",
             note="above the baseline; jobs that already ended hold none")
    b.figure("run() loop", t_sub, "s")
    b.figure("first run() to all reaped", wall, "s", ("<=", 4.0),
             note="target is for 1,000 x sleep 2" if not b.quick else
             "quick: %d x sleep %s" % (n, sleep))
    b.figure("reaped after the last sleep ended", wall - t_sub - sleep, "s",
             note="approximate: the last job was spawned at the end of the run() loop")


# ---------------------------------------------------------------------------
# Section registry
# ---------------------------------------------------------------------------
# name -> (function(bench), one-line description), run in this order.
# >>> To add a section (e.g. "http", once pman.make_server exists): write
# >>> `def sec_http(b): ...` that uses b.state_dir(), b.manager() and
# >>> b.figure(name, value, unit, target=(">=" | "<=", bound), note=...),
# >>> honour b.quick (the whole --quick run must stay under 30 s), and add
# >>> it here.  It then appears in --section choices and the default run.

SECTIONS = collections.OrderedDict([
    ("spawn", (sec_spawn, "2,000 `true` jobs: pman vs raw Popen")),
    ("latency", (sec_latency, "submit -> started, exit -> status visible")),
    ("scale", (sec_scale, "100,000 finished jobs in state")),
    ("concurrency", (sec_concurrency, "1,000 concurrent sleep jobs")),
    # ("http", (sec_http, "HTTP API round trips")),    # <<< reserved, see above
])


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def machine_info(base_dir):
    tmp = base_dir or tempfile.gettempdir()
    return collections.OrderedDict([
        ("cpu count", os.cpu_count()),
        ("usable cpus", len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
         else os.cpu_count()),
        ("python", "%s %s" % (platform.python_implementation(), platform.python_version())),
        ("platform", platform.platform()),
        ("pidfds in use (pman._HAVE_PIDFD)", bool(getattr(pman, "_HAVE_PIDFD", False))),
        ("temp dir", "%s (%s)" % (tmp, fs_type(tmp))),
        ("RLIMIT_NOFILE soft", _nofile()),
        ("load average (1, 5, 15 min)", " ".join("%.2f" % x for x in os.getloadavg())),
        ("pman version", pman.__version__),
    ])


def _nofile():
    try:
        import resource
        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except Exception:
        return None


class _ReaperProfiles:
    """--profile: run every reaper thread under its own cProfile."""

    def __init__(self):
        self.profiles = []
        self._orig = getattr(pman.JobManager, "_reap_loop", None)
        if self._orig is None:      # renamed: profile the main thread only
            return
        orig, profiles = self._orig, self.profiles

        def _reap_loop(mgr):
            p = cProfile.Profile()
            p.enable()
            try:
                orig(mgr)
            finally:
                p.disable()
                profiles.append(p)
        pman.JobManager._reap_loop = _reap_loop

    def restore(self):
        if self._orig is not None:
            pman.JobManager._reap_loop = self._orig


def _print_profile(title, profiles, limit=25):
    if not profiles:
        return
    buf = io.StringIO()
    stats = pstats.Stats(profiles[0], stream=buf)
    for p in profiles[1:]:
        stats.add(p)
    stats.sort_stats("tottime").print_stats(limit)
    sys.stderr.write("\n==== cProfile %s (by tottime) ====\n%s" % (title, buf.getvalue()))


def print_table(results, out):
    rows = []
    for section, figures in results.items():
        rows.append(None)
        rows.append(("[%s]" % section, "", "", ""))
        for name, f in figures.items():
            value = _fmt(f["value"]) + ((" " + f["unit"]) if f["unit"] else "")
            ok = "" if f["ok"] is None else ("ok" if f["ok"] else "MISS")
            if name == "error":
                ok = "ERROR"
            rows.append(("  " + name, value, f["target"] or "", ok))
    widths = [max(len(r[i]) for r in rows if r) for i in range(4)]
    header = ("figure", "measured", "target", "ok/MISS")
    widths = [max(w, len(h)) for w, h in zip(widths, header)]
    line = " | ".join("%-*s" % (w, h) for w, h in zip(widths, header))
    out.write(line + "\n" + "-" * len(line) + "\n")
    for r in rows:
        if r is None:
            continue
        out.write(" | ".join("%-*s" % (w, c) for w, c in zip(widths, r)).rstrip() + "\n")
    notes = [(s, n, f["note"]) for s, fs in results.items() for n, f in fs.items()
             if f.get("note")]
    if notes:
        out.write("\nnotes:\n")
        for s, n, note in notes:
            out.write("  %s / %s: %s\n" % (s, n, note))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="reduced sizes (< 30 s); for CI, which checks it runs")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--section", action="append", choices=list(SECTIONS),
                        help="run only this section (repeatable)")
    parser.add_argument("--dir", default=None,
                        help="parent of the temporary state directories (default: %s)"
                        % tempfile.gettempdir())
    parser.add_argument("--scale-logs", action="store_true",
                        help="scale: also create 2 empty log files per synthetic job "
                        "(slow on some disks: 200,000 file creations)")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the main and reaper threads per section (stderr)")
    args = parser.parse_args(argv)
    selected = args.section or list(SECTIONS)
    selected = [s for s in SECTIONS if s in selected]

    info = machine_info(args.dir)
    bench = Bench(args.quick, args.dir, args.scale_logs)
    bench.results["machine"] = collections.OrderedDict(
        (k, {"value": v, "unit": "", "target": None, "ok": None}) for k, v in info.items())
    if not args.json:
        sys.stdout.write("pman benchmark%s\n" % (" (--quick sizes)" if args.quick else ""))
        for k, v in info.items():
            sys.stdout.write("  %-34s %s\n" % (k, v))
        sys.stdout.flush()

    failed = []
    t_all = perf()
    for name in selected:
        fn, desc = SECTIONS[name]
        bench.section = name
        sys.stderr.write("== %s: %s\n" % (name, desc))
        sys.stderr.flush()
        reapers = _ReaperProfiles() if args.profile else None
        main_prof = cProfile.Profile() if args.profile else None
        t0 = perf()
        try:
            if main_prof:
                main_prof.enable()
            try:
                fn(bench)
            finally:
                if main_prof:
                    main_prof.disable()
        except Exception as e:
            traceback.print_exc()
            failed.append(name)
            bench.figure("error", "%s: %s" % (type(e).__name__, e), "", None)
            bench.results[name]["error"]["ok"] = False
        finally:
            bench.cleanup()
            if reapers:
                reapers.restore()
        sys.stderr.write("   (%s took %.1f s)\n" % (name, perf() - t0))
        if args.profile:
            _print_profile("%s: main thread" % name, [main_prof])
            _print_profile("%s: reaper threads" % name, reapers.profiles)
    sys.stderr.write("== total %.1f s\n" % (perf() - t_all))
    load = " ".join("%.2f" % x for x in os.getloadavg())
    bench.results["machine"]["load average at the end"] = {
        "value": load, "unit": "", "target": None, "ok": None}

    if args.json:
        json.dump(bench.results, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write("\n")
        print_table(collections.OrderedDict(
            (k, v) for k, v in bench.results.items() if k != "machine"), sys.stdout)
        missed = [(s, n) for s, fs in bench.results.items() for n, f in fs.items()
                  if f["ok"] is False and n != "error"]
        sys.stdout.write("\nload average at the end: %s (the machine was shared if it "
                         "is high: compare with the start)\n" % load)
        sys.stdout.write("%d target(s) missed%s\n" % (
            len(missed), (": " + ", ".join("%s/%s" % m for m in missed)) if missed else ""))
        if failed:
            sys.stdout.write("section(s) that failed to run: %s\n" % ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
