"""pman: a process manager for shell jobs, in one standard-library module.

pman launches shell commands (or argv lists) as jobs and tracks them: their
status, exit code, output, kill and timeout, all of it surviving a restart of
the manager.  Jobs run as process groups on this machine, or as batch jobs on
a SLURM cluster (``backend="slurm"``).  It is a library first::

    import pman
    job = pman.JobManager().run("cal 7 1970", jid="123")
    pman.JobManager().wait("123")["returncode"]          # -> 0

and an HTTP server second (``python pman.py --http --port 5010``), speaking
both dialects of the original pman's ``/api/v1`` API.

Vendoring
---------
Copy this one file into your project.  It needs Python 3.9+ on Linux and
nothing outside the standard library.

State
-----
Everything lives in one state directory (``$PMAN_STATE_DIR``, else
``$XDG_STATE_HOME/pman``, else ``~/.local/state/pman``; mode 0700):

``lock``
    flock()ed by the one process that owns the directory; holds its pid.
``state.jsonl``
    the snapshot: a header line, then one JSON line per job, written
    atomically (temporary file, fsync, ``os.replace``).
``journal-<generation>.jsonl``
    the append-only journal of changes since the snapshot.  A submission is
    fsynced before ``run()`` returns; concurrent submitters share fsyncs.
``logs/<jid>.out``, ``logs/<jid>.err``
    each job's stdout and stderr (mode 0600).
``exits``
    one line ``<seq> <code>`` appended by each job's wrapper shell when the
    job ends, so an exit code is never lost while the manager is down;
    emptied when no job runs.

Threading model
---------------
A `JobManager` owns one reaper thread (``pman-reaper``) whatever the number
of jobs: it waits on a pidfd per running job with `selectors`, collects exit
statuses with ``waitpid(pid)`` (never ``waitpid(-1)``, which would steal the
statuses of the host application's own children), fires timeouts and kill
escalations, and starts queued jobs.  All job state is guarded by one lock.
`JobManager` objects opened on the same directory in one process share one
manager.  When the program exits, running jobs keep running and the next
manager re-adopts them, unless the manager was closed with ``kill=True``.

The HTTP server (`make_server`) reads every connection in one thread, the
one that calls ``serve_forever()``; a connection gets a handler thread
(``pman-http``) only while it has a complete request in progress.
"""

__version__ = "0.1.0"

__all__ = [
    "JobManager", "PmanError", "JobNotFound", "JobConflict", "InvalidArgument",
    "StateLocked", "StateCorrupt", "Timeout", "BackendUnavailable", "SubmitRejected",
    "LocalBackend", "SlurmBackend", "STATUSES", "make_server", "main",
]
# Not exported: the persistence (_Store), process (_spawn...) and HTTP handler
# internals, which may change between versions.

import atexit
import collections
import email.utils
import errno
import fcntl
import heapq
import math
import hmac
import http
import http.server
import io
import ipaddress
import itertools
import json
import logging
import os
import platform
import re
import resource
import select
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.parse
import zlib
from datetime import datetime, timezone
from time import monotonic as _time
from time import time as _wall

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

NOTSTARTED = "notstarted"
STARTED = "started"
SUCCESS = "finishedSuccessfully"
ERROR = "finishedWithError"
UNDEFINED = "undefined"
STATUSES = (NOTSTARTED, STARTED, SUCCESS, ERROR, UNDEFINED)
ACTIVE = (NOTSTARTED, STARTED)
_STATUS_SET, _ACTIVE_SET = frozenset(STATUSES), frozenset(ACTIVE)

JID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
RESERVED_JIDS = frozenset({"cmd", "jobs", "hello", "openapi.json"})
# The fields pfcon sends with every job: recorded, never enforced.
PFCON_FIELDS = ("number_of_workers", "cpu_limit", "memory_limit", "gpu_limit",
                "image", "type", "input_dir", "output_dir", "args_path_flags")

DEFAULT_GRACE = 5.0
STATE_FORMAT = 2           # snapshot lines carry a CRC-32; format 1 still loads
SNAPSHOT = "state.jsonl"
COMPACT_EVERY = 20000       # journal lines between compactions
FLUSH_DELAY = 0.2           # how soon the reaper makes job endings durable
LOG_CHECK_EVERY = 0.5       # how often running jobs' logs are measured
POLL_INTERVAL = 0.01        # the reaper's poll period where pidfds are missing
RESEND_WINDOW, RESEND_DELAY = 0.5, 0.05   # see JobManager._signal
TIMER_RETRY = 1.0           # a timer whose action failed fires again this much later
LOCK_RETRY = 2.0            # seconds to wait for a dead holder's lock to clear
EXIT_LOG_MAX = 1 << 20      # empty the exit log past this size when no job runs
MAX_SECONDS = 1e8           # the largest timeout, grace or wait accepted (3 years)
MAX_SLEEP = 3600.0          # the reaper wakes at least this often
MAX_DEPTH = 64              # nesting levels of a job's meta (and extras) accepted
_MISSING = object()
TAIL_LINES, TAIL_BYTES = 1000, 65536

# The wrapper that runs every job.  The command is a positional parameter,
# never part of the script text.  `trap : TERM` is a handler, not an ignore,
# so the subshell resets it and the job does not inherit SIG_IGN, while the
# wrapper itself survives a group SIGTERM long enough to record the exit
# status.  A subshell costs one fork less than a nested `sh -c`.
_WRAP_SHELL = 'trap : TERM; (eval "$3"); r=$?; echo "$1 $r" >>"$2"; exit $r'
_WRAP_ARGV = 'trap : TERM; t=$1; f=$2; shift 2; ("$@"); r=$?; echo "$t $r" >>"$f"; exit $r'


def _now():
    return datetime.now(timezone.utc).isoformat()


def _parse_time(stamp):
    return datetime.fromisoformat(stamp).timestamp()


# ---------------------------------------------------------------------------
# Exceptions
# ---------------------------------------------------------------------------

class PmanError(Exception):
    """Root of every error pman raises.  ``str(e)`` says what is wrong."""


class InvalidArgument(PmanError, ValueError):
    """A bad argument: an invalid jid, signal, command, env, cwd or option."""


class JobNotFound(PmanError, KeyError):
    """No job has this jid.  Attribute: ``jid``."""

    def __init__(self, jid):
        super().__init__("no job with jid %r" % (jid,))
        self.jid = jid

    __str__ = PmanError.__str__


class JobConflict(PmanError):
    """The jid is queued or running (or must be finished for this call).
    Attribute: ``jid``."""

    def __init__(self, jid, message):
        super().__init__(message)
        self.jid = jid


class Timeout(PmanError, TimeoutError):
    """`JobManager.wait` ran out of time.  Attribute: ``jobs``, the jobs'
    records as they were when the wait gave up."""

    def __init__(self, message, jobs):
        super().__init__(message)
        self.jobs = jobs


class StateLocked(PmanError):
    """Another process owns the state directory.  Attributes: ``path``,
    ``pid`` (the holder's, or None if unknown)."""

    def __init__(self, path, pid):
        super().__init__("state directory %s is in use by another pman "
                         "manager (pid %s)" % (path, pid or "unknown"))
        self.path, self.pid = path, pid


class StateCorrupt(PmanError):
    """The state files are damaged and the manager was opened with
    ``strict=True``.  Attribute: ``path``."""

    def __init__(self, path, message):
        super().__init__("%s: %s" % (path, message))
        self.path = path


# ---------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------

def check_jid(jid):
    """Return *jid* if it is a valid job id, else raise InvalidArgument."""
    if not isinstance(jid, str) or not JID_RE.fullmatch(jid):
        raise InvalidArgument(
            "invalid jid %r: it must match [A-Za-z0-9][A-Za-z0-9._-]{0,127}"
            % (jid if isinstance(jid, str) else type(jid).__name__,))
    if jid in RESERVED_JIDS:
        raise InvalidArgument("invalid jid %r: it is a reserved route name" % jid)
    return jid


def parse_signal(sig):
    """Turn 15, "15", "TERM" or "SIGTERM" into a signal number."""
    if isinstance(sig, bool):
        raise InvalidArgument("invalid signal %r" % (sig,))
    if isinstance(sig, str):
        name = sig.strip().upper()
        if name.isdigit():
            sig = int(name)
        else:
            if not name.startswith("SIG"):
                name = "SIG" + name
            member = getattr(signal.Signals, name, None) if name.isidentifier() else None
            if member is None:
                raise InvalidArgument("unknown signal %r" % (sig,))
            return int(member)
    if isinstance(sig, int) and 0 < sig < signal.NSIG:
        return int(sig)
    raise InvalidArgument("invalid signal %r" % (sig,))


def signal_name(sig):
    try:
        return signal.Signals(sig).name
    except ValueError:
        return "signal %d" % sig


def _check_number(name, value, allow_none=True):
    if value is None and allow_none:
        return None
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not 0 <= value <= MAX_SECONDS):
        raise InvalidArgument("%s must be a number from 0 to %g, not %r"
                              % (name, MAX_SECONDS, value))
    return value


def _depth_ok(value, limit):
    """True if *value* (JSON data) nests at most *limit* lists/objects deep.
    Iterative: a hostile value cannot exhaust the stack here."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, (list, tuple)):
            children = node
        else:
            continue
        if depth > limit:
            return False
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, (dict, list, tuple)))
    return True


def _refuse_constant(name):
    raise ValueError("%s is not a JSON number" % name)


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("%s is out of range for a JSON number" % text)
    return value


# json.loads for anything from outside: NaN, Infinity and numbers that
# overflow a float (1e400) are refused (ValueError), as strict parsers
# (JavaScript, jq, Go) would refuse them in pman's replies.
_loads = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float).decode


def _check_env(env):
    if env is None:
        return None
    if isinstance(env, (list, tuple)):
        pairs = {}
        for item in env:
            if not isinstance(item, str) or "=" not in item:
                raise InvalidArgument("env entries must be 'KEY=value' strings, not %r" % (item,))
            key, _, value = item.partition("=")
            pairs[key] = value
        env = pairs
    if not isinstance(env, dict):
        raise InvalidArgument("env must be a dict or a list of 'KEY=value' strings")
    for key, value in env.items():
        if (not isinstance(key, str) or not key or "=" in key or "\0" in key
                or not isinstance(value, str) or "\0" in value):
            raise InvalidArgument("invalid env entry %r=%r: keys and values are "
                                  "strings, keys non-empty without '='" % (key, value))
    return dict(env)


# ---------------------------------------------------------------------------
# The job model
# ---------------------------------------------------------------------------

# Persisted fields, in the order they are written.  jid, status and seq come
# first so that a loader can index a line without parsing it (_LINE_RE).
_FIELDS = ("jid", "status", "seq", "message", "returncode", "pid", "cmd", "argv",
           "auid", "meta", "env", "cwd", "timeout", "extras", "submitted",
           "started", "ended", "ident", "kill_signal", "kill_reason", "backend_id")
_LINE_RE = re.compile(r'\{"jid": "([A-Za-z0-9._-]+)", "status": "(\w+)", "seq": (\d+),')


class _Job:
    """A job that is queued or running.  A finished job is kept only as its
    JSON line (a str): compact, and already serialized for the journal.
    All access MUST hold the manager's lock."""

    __slots__ = _FIELDS + ("popen", "pidfd", "spawned_at", "escalate_at")

    def __init__(self, **fields):
        for name in _FIELDS:
            setattr(self, name, fields.get(name))
        self.popen = self.pidfd = self.spawned_at = self.escalate_at = None

    def line(self):
        # allow_nan=False: a record holding NaN or Infinity is never written
        # (strict JSON readers, pman's own loader among them, refuse it).
        return json.dumps({name: getattr(self, name) for name in _FIELDS}, allow_nan=False)


_NONE = type(None)
# What a loader accepts in each persisted field: exact types, so that a bool
# never passes for an int.
_FIELD_TYPES = {
    "jid": {str}, "status": {str}, "seq": {int}, "message": {str},
    "returncode": {int, _NONE}, "pid": {int, _NONE}, "cmd": {str}, "argv": {list, _NONE},
    "auid": {str}, "meta": {dict}, "env": {dict, _NONE}, "cwd": {str, _NONE},
    "timeout": {int, float, _NONE}, "extras": {dict, _NONE}, "submitted": {str, _NONE},
    "started": {str, _NONE}, "ended": {str, _NONE}, "ident": {list, _NONE},
    "kill_signal": {int, _NONE}, "kill_reason": {str, _NONE}, "backend_id": {str, _NONE}}
_REQUIRED = frozenset(_FIELD_TYPES) - {"backend_id"}    # added after format 1 was out


def _record_problem(rec):
    """Why the parsed state line *rec* is not a job record that pman could
    have written, or None.  Every field's type is checked, so that a record
    that loads can always be listed, searched and served."""
    if type(rec) is not dict:
        return "not a JSON object"
    if not rec.keys() <= _FIELD_TYPES.keys():
        return "unknown field(s) %s" % ", ".join(sorted(rec.keys() - _FIELD_TYPES.keys()))
    if not _REQUIRED <= rec.keys():
        return "missing field(s) %s" % ", ".join(sorted(_REQUIRED - rec.keys()))
    for name, value in rec.items():
        if type(value) not in _FIELD_TYPES[name]:
            return "%r is a %s" % (name, type(value).__name__)
    if not JID_RE.fullmatch(rec["jid"]):
        return "invalid jid"
    if rec["status"] not in STATUSES:
        return "unknown status %r" % rec["status"][:40]
    if rec["seq"] < 0:
        return "negative seq"
    if rec["argv"] is not None and not all(type(a) is str for a in rec["argv"]):
        return "argv is not a list of strings"
    if rec["env"] and not all(type(v) is str for v in rec["env"].values()):
        return "env values are not strings"
    for name in ("submitted", "started", "ended"):
        if rec[name] is not None:
            try:
                datetime.fromisoformat(rec[name])
            except ValueError:
                return "%r is not an ISO 8601 time" % name
    if ((rec["meta"] and not _depth_ok(rec["meta"], MAX_DEPTH))
            or (rec["extras"] and not _depth_ok(rec["extras"], MAX_DEPTH))):
        return "meta nested too deeply"
    return None


def _record(entry):
    """A fresh record dict (a deep copy) of a stored job: a _Job or a
    finished job's line."""
    return json.loads(entry if isinstance(entry, str) else entry.line())


def _entry_status(entry):
    if isinstance(entry, str):
        return _LINE_RE.match(entry).group(2)
    return entry.status


# ---------------------------------------------------------------------------
# Persistence
# ---------------------------------------------------------------------------

def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path, chunks):
    """Write *chunks* to *path* so that a crash leaves the old or the new
    file, never a mix, and never a temporary file that a loader would read."""
    tmp = "%s.tmp-%d" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", closefd=False) as f:
            f.writelines(chunks)
            f.flush()
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


# Format 2 of the snapshot: each line (header included) is the JSON object
# pman keeps, with the CRC-32 of its UTF-8 text as a last member, so that the
# file stays JSON Lines and a loader can trust a line without parsing it:
#   {"jid": "a", ..., "backend_id": null, "crc": "1c291ca3"}
# Journal lines are plain records, parsed and checked when they are replayed.
_CRC_HEAD = b', "crc": "'


def _frame(line):
    """The snapshot form of *line* (a JSON object's text)."""
    return '%s, "crc": "%08x"}' % (line[:-1], zlib.crc32(line.encode("utf-8")))


def _unframe(raw):
    """For a snapshot line *raw* (bytes ending in a newline): the original
    line's bytes if it carries a matching checksum, False if it carries one
    that does not match, None if it carries none."""
    if raw[-21:-11] != _CRC_HEAD or raw[-3:] != b'"}\n':
        return None
    body = raw[:-21] + b"}"
    try:
        return body if int(raw[-11:-3], 16) == zlib.crc32(body) else False
    except ValueError:
        return False


def _line_problem(obj, line):
    """Why the parsed unframed line *obj* (text *line*) cannot be replayed,
    or None: a job record, or ``{"forget": [jid, ...]}``."""
    if isinstance(obj, dict) and set(obj) == {"forget"}:
        jids = obj["forget"]
        ok = isinstance(jids, list) and all(isinstance(j, str) for j in jids)
        return None if ok else "bad forget line"
    problem = _record_problem(obj)
    if problem is None:
        m = _LINE_RE.match(line)        # the fields read later without parsing
        if m is None or (m.group(1), m.group(2), int(m.group(3))) != (
                obj["jid"], obj["status"], obj["seq"]):
            problem = "fields out of order"
    return problem


def _read_header(raw):
    """(format, generation, next_seq) from a snapshot's first line, or None
    if it is not a header this version can trust."""
    if raw[-1:] != b"\n":
        return None
    body = _unframe(raw)
    try:
        header = _loads((raw[:-1] if body is None else body or b"").decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    if not isinstance(header, dict):
        return None
    version = header.get("pman_state")
    # Format 1 is unframed; a later one is framed (a lost checksum is damage).
    if type(version) is not int or version not in (1, STATE_FORMAT) or (
            (version > 1) != (body is not None)):
        return None
    gen, next_seq = header.get("generation", 0), header.get("next_seq", 1)
    for value in (gen, next_seq):
        if type(value) is not int or not 0 <= value < 1 << 63:
            return None
    return version, gen, max(1, next_seq)


class _Store:
    """Snapshot + append-only journal.  The whole persistence interface:

    - ``load()`` -> (ordered {jid: line}, next_seq, damaged): replays the
      snapshot and journals; moves damaged files aside;
    - ``append(line)`` -> ticket: queue one line (caller holds the manager
      lock, so the journal order is the order of the changes);
    - ``sync(ticket)``: return once that line is on disk (group commit);
    - ``rotate()`` / ``write_snapshot(lines, gen)``: compaction;
    - ``close()``.

    Lines are JSON objects: a job record (see _FIELDS) or ``{"forget":
    [jid, ...]}``.  A torn last journal line (a crash mid-write) is dropped;
    any other bad line is reported and its file kept aside.
    """

    def __init__(self, path, strict=False):
        self.path = path
        self.strict = strict
        self._lock = threading.Lock()           # guards all below
        self._cond = threading.Condition(self._lock)
        self._pending = []                      # lines not yet written
        self._appended = 0                      # ticket of the last append
        self._synced = 0                        # tickets <= this are on disk
        self._flushing = False                  # a thread is writing
        self._fd = None
        self.generation = 0
        self.journal_lines = 0

    # -- loading ----------------------------------------------------------

    def _journal_path(self, gen):
        return os.path.join(self.path, "journal-%d.jsonl" % gen)

    def _journals(self):
        found = []
        for name in os.listdir(self.path):
            m = re.fullmatch(r"journal-(\d+)\.jsonl", name)
            if m:
                found.append(int(m.group(1)))
        return sorted(found)

    def _set_aside(self, path, why):
        aside = "%s.corrupt-%s" % (path, datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ"))
        os.rename(path, aside)
        log.warning("%s: %s; the file was kept as %s and the good records were loaded",
                    path, why, aside)
        return aside

    def load(self):
        """Return (jobs, next_seq, replayed): replayed is True when journals
        or damaged files were read, or the snapshot has an older format, so
        a fresh snapshot should be written.  Nothing is deleted or moved
        unless the whole load succeeds."""
        jobs = {}
        self.active = set()         # jids whose last record is queued or running
        self._next_seq = 1
        replayed = False
        cleanup = [os.path.join(self.path, name) for name in os.listdir(self.path)
                   if ".tmp-" in name]          # leftovers of an interrupted write
        aside = []
        snap = os.path.join(self.path, SNAPSHOT)
        snap_gen = 0
        if os.path.exists(snap):
            bad, torn = [], [False]
            with open(snap, "rb") as f:     # streamed: 100k lines, one copy
                first = f.readline()
                header = _read_header(first)
                if header is None:
                    # Without a trusted generation every journal is replayed.
                    bad.append("header")
                    lines = itertools.chain([first], f) if first else f
                else:
                    version, snap_gen, self._next_seq = header
                    replayed = version != STATE_FORMAT
                    lines = f
                self._apply(self._lines(lines, bad, torn), jobs, bad)
            torn = torn[0]
            if bad or torn:     # written atomically: any damage came from outside
                aside.append((snap, "damaged snapshot (%d bad lines%s)" % (
                    len(bad), ", truncated" if torn else "")))
                replayed = True
        for gen in self._journals():
            path = self._journal_path(gen)
            if gen < snap_gen:                  # already inside the snapshot
                cleanup.append(path)
                continue
            bad, torn = [], [False]
            with open(path, "rb") as f:
                # A torn last line is a crash mid-write: never acknowledged, dropped.
                count = self._apply(self._lines(f, bad, torn), jobs, bad)
            if bad:
                aside.append((path, "damaged journal (%d bad lines)" % len(bad)))
            replayed = replayed or bool(count) or torn[0] or bool(bad)
            snap_gen = max(snap_gen, gen)
        if aside and self.strict:
            raise StateCorrupt(aside[0][0], aside[0][1] + " (opened with strict=True: "
                               "nothing was changed)")
        for path, why in aside:
            self._set_aside(path, why)
        for path in cleanup:
            os.unlink(path)
        self.generation = snap_gen
        return jobs, self._next_seq, replayed

    def _apply(self, lines, jobs, bad):
        """Replay checked lines (see _lines) into *jobs* (ordered); collect
        bad lines; note the jids whose last line is active in self.active.
        Returns the number of lines."""
        count = 0
        active = self.active
        match, statuses, actives = _LINE_RE.match, _STATUS_SET, _ACTIVE_SET
        next_seq = self._next_seq
        for line in lines:
            count += 1
            m = match(line)
            if m:
                jid, status, seq = m.groups()
                if status not in statuses:      # a checksum proves no more than bytes
                    bad.append(line[:40])
                    continue
                old = jobs.get(jid)
                if old is not None and match(old).group(3) != seq:
                    del jobs[jid]           # a re-run moves to the end
                jobs[jid] = line
                if status in actives:
                    active.add(jid)
                elif active:
                    active.discard(jid)
                seq = int(seq)
                if seq >= next_seq:
                    next_seq = seq + 1
                continue
            try:
                for jid in json.loads(line)["forget"]:
                    jobs.pop(jid, None)
                    active.discard(jid)
            except (ValueError, KeyError, TypeError):
                bad.append(line[:40])
        self._next_seq = next_seq
        return count

    @staticmethod
    def _lines(f, bad, torn):
        """Yield the lines of binary file *f* that can be trusted, as str.
        A format-2 snapshot line is trusted when its checksum matches (cheap:
        100,000 lines load in well under a second); any other line (a
        journal's, format 1's) is parsed and checked field by field.  Bad
        lines go to *bad*; a last line without its newline is torn
        (``torn[0]``) and dropped."""
        crc32 = zlib.crc32
        for raw in f:
            if raw[-3:] == b'"}\n' and raw[-21:-11] == _CRC_HEAD:   # the fast path
                body = raw[:-21] + b"}"
                try:
                    if crc32(body) == int(raw[-11:-3], 16):
                        yield body.decode("utf-8")
                        continue
                except ValueError:      # UnicodeDecodeError included
                    pass
                bad.append(raw[:40])
                continue
            if raw[-1:] != b"\n":
                torn[0] = True
                return
            if len(raw) <= 1:
                continue
            try:                # no checksum: parse it and check every field
                line = raw[:-1].decode("utf-8")
                ok = _line_problem(_loads(line), line) is None
            except (ValueError, RecursionError):    # UnicodeDecodeError included
                ok = False
            if ok:
                yield line
            else:
                bad.append(raw[:40])

    # -- writing ----------------------------------------------------------

    def open_journal(self, gen):
        fd = os.open(self._journal_path(gen),
                     os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        old, self._fd = self._fd, fd
        self.generation = gen
        self.journal_lines = 0
        if old is not None:
            os.close(old)

    def append(self, line):
        with self._lock:
            self._pending.append(line + "\n")
            self._appended += 1
            self.journal_lines += 1
            return self._appended

    def sync(self, ticket=None):
        """Return once the line *ticket* (default: every line so far) is on
        disk.  One caller writes and fsyncs for everybody waiting."""
        with self._lock:
            if ticket is None:
                ticket = self._appended
            while self._synced < ticket:
                if self._flushing:
                    self._cond.wait()
                    continue
                self._write_pending()

    def _write_pending(self):
        """Caller holds self._lock; it is released during the write."""
        self._flushing = True
        batch, self._pending = self._pending, []
        upto, fd = self._appended, self._fd
        self._lock.release()
        start = None
        try:
            if batch:
                data = "".join(batch).encode("utf-8")
                start = os.lseek(fd, 0, os.SEEK_END)
                while data:
                    data = data[os.write(fd, data):]
                os.fdatasync(fd)
        except BaseException:
            if start is not None:       # e.g. ENOSPC mid-batch: undo the part written
                try:
                    os.ftruncate(fd, start)
                except OSError:
                    pass
            self._lock.acquire()
            self._pending[:0] = batch
            self._flushing = False
            self._cond.notify_all()
            raise
        self._lock.acquire()
        self._synced = max(self._synced, upto)
        self._flushing = False
        self._cond.notify_all()

    def rotate(self):
        """Make everything appended so far durable in the current journal,
        then start a new one; return its generation.  The caller holds the
        manager lock, so the lines it snapshots next are exactly the state
        the old journals describe."""
        with self._lock:
            while self._flushing or self._synced < self._appended:
                if self._flushing:
                    self._cond.wait()
                else:
                    self._write_pending()
            self.open_journal(self.generation + 1)
            return self.generation

    def write_snapshot(self, lines, gen, next_seq):
        header = json.dumps({"pman_state": STATE_FORMAT, "generation": gen,
                             "next_seq": next_seq, "written": _now(),
                             "pman_version": __version__})
        _write_atomic(os.path.join(self.path, SNAPSHOT), itertools.chain(
            (_frame(header), "\n"),
            itertools.chain.from_iterable((_frame(line), "\n") for line in lines)))
        for old in self._journals():
            if old < gen:
                os.unlink(self._journal_path(old))

    def close(self):
        self.sync()
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


# ---------------------------------------------------------------------------
# Process handling: spawn, identity, reap, kill
# ---------------------------------------------------------------------------

def _boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


_BOOT_ID = _boot_id()


def _proc_stat(pid):
    """(start time in clock ticks, state letter) of *pid*, or None.  Fields
    are read after the last ')' because the command name may contain any
    character."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2:].split()
    return int(fields[19]), fields[0].decode()


def _identity(pid):
    stat = _proc_stat(pid)
    return None if stat is None else [stat[0], _BOOT_ID]


def _is_alive(job, exits_path):
    """True if the process recorded for *job* still runs (zombies are gone)
    and is the same process: same start time and boot.  A job whose
    identity was not recorded (the manager died right after the spawn) is
    recognized by its wrapper's command line instead."""
    stat = _proc_stat(job.pid) if job.pid else None
    if stat is None or stat[1] == "Z":
        return False
    if job.ident is not None:
        return job.ident == [stat[0], _BOOT_ID]
    try:
        with open("/proc/%d/cmdline" % job.pid, "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return (argv[3:6] == [b"pman-job", str(job.seq).encode(), exits_path.encode()]
            and argv[2] in (_WRAP_SHELL.encode(), _WRAP_ARGV.encode()))


def _pid_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _pidfd(pid):
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _probe_pidfd():
    fd = _pidfd(os.getpid())
    if fd is None:
        return False
    os.close(fd)
    return True


_HAVE_PIDFD = _probe_pidfd()   # Linux 5.3+; else the reaper polls


def _open_log(path):
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)


def _describe_exit(code):
    """Message for an exit code of the job's own making."""
    if code == 0:
        return SUCCESS, 0, "exited with code 0"
    if code > 128 and code - 128 < signal.NSIG:
        return ERROR, code, ("exited with code %d, which is also what a shell "
                             "reports for %s" % (code, signal_name(code - 128)))
    return ERROR, code, "exited with code %d" % code


class _ExitLog:
    """The file ``exits`` in the state directory: one line ``<seq> <code>``
    appended by each job's wrapper when the job ends, so that no exit code
    is lost while no manager watches.  One O_APPEND write per job (atomic
    for a line this short) instead of a file per job.  It is emptied when
    no job can still write to it."""

    def __init__(self, path):
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)
        self._codes = {}        # seq -> code, read so far
        self._offset = 0

    def code(self, seq):
        """The code job *seq* wrote, or None."""
        if seq not in self._codes:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
            end = data.rfind(b"\n") + 1       # a line being written waits
            self._offset += end
            for line in data[:end].split(b"\n"):
                parts = line.split()
                if len(parts) == 2 and parts[0].isdigit() and parts[1].lstrip(b"-").isdigit():
                    self._codes[int(parts[0])] = int(parts[1])
        return self._codes.get(seq)

    def clear(self):
        """Empty the file.  Only when no wrapper is alive to append."""
        with open(self.path, "wb"):
            pass
        self._codes, self._offset = {}, 0


def _wrapped_argv(job, exits_path):
    """The wrapper shell's argv for *job*: the command travels as data."""
    head = ["/bin/sh", "-c", _WRAP_ARGV if job.argv is not None else _WRAP_SHELL,
            "pman-job", str(job.seq), exits_path]
    return head + job.argv if job.argv is not None else head + [job.cmd]


_Exit = collections.namedtuple("_Exit", "code status message")
_Exit.__new__.__defaults__ = (None, None)   # status, message: derived from code


class BackendUnavailable(PmanError):
    """The backend cannot take jobs now (no ``sbatch``, the controller does
    not answer...).  The HTTP layer answers 503."""


class SubmitRejected(PmanError):
    """The backend refused this job; the message is the backend's own."""


class _Waker:
    """A self-pipe to interrupt a backend's wait."""

    def __init__(self):
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def wake(self):
        try:
            os.write(self.w, b"x")
        except BlockingIOError:
            pass

    def sleep(self, timeout):
        """Sleep up to *timeout* s (None: forever) or until woken."""
        if select.select([self.r], [], [], timeout)[0]:
            _drain(self.r)

    def close(self):
        os.close(self.r)
        os.close(self.w)


class LocalBackend:
    """Jobs as process groups on this machine (the default backend).

    The backend seam, which `SlurmBackend` implements too.  All methods but
    `wait` and `close` are called with the manager's lock held:

    - ``open(log_dir, log_path)``: bind to a manager's state;
    - ``start(job, env)``: launch *job* (``env``: the merged environment, or
      None for the manager's own); set ``pid``/``backend_id`` and ``message``
      and return the new status (STARTED, or NOTSTARTED while the backend
      queues it).  Raise OSError (or SubmitRejected, BackendUnavailable) if
      it cannot start;
    - ``watch(job)`` / ``unwatch(job)``: begin / end tracking a job;
    - ``wait(timeout)``: block until a watched job may have changed, or
      ``wake()``; return the jobs to ``check``;
    - ``check(job)``: None if nothing changed, "started" when a queued job
      starts, "changed" for another change worth saving, or an ``_Exit``
      once the job has ended;
    - ``signal(job, sig)``: deliver *sig*; False if the job is already gone;
    - ``recover(job)``: after a restart: True (still running: watch it) or
      an ``_Exit``; ``recover_queued(job)`` the same for a job journaled as
      queued, or False: it never started, queue it;
    - ``settle(job)``: called without the lock after a start; may return
      an identity to record (local: the process's start time);
    - ``idle()``: no job is running (local: empty the exit log);
    - ``wake()``, ``close()``.
    """

    name = "local"
    resend_window = RESEND_WINDOW   # see JobManager._signal
    journal_before_start = False    # a local spawn leaves traces recovery can find

    def __init__(self):
        self.log_dir = None

    def open(self, log_dir, log_path):
        self.log_dir, self.log_path = log_dir, log_path
        self._exits = _ExitLog(os.path.join(os.path.dirname(log_dir), "exits"))
        self._orphans = None            # seq -> pid of wrappers found at startup
        self._waker = _Waker()
        self._watched = {}          # jid -> job; the reaper polls these without pidfds
        self._selector = selectors.DefaultSelector() if _HAVE_PIDFD else None
        if self._selector is not None:
            self._selector.register(self._waker.r, selectors.EVENT_READ, None)


    def start(self, job, env):
        if job.cwd is not None and not os.path.isdir(job.cwd):
            raise FileNotFoundError(errno.ENOENT, "no such directory (cwd)", job.cwd)
        if job.argv is not None:
            exe = job.argv[0]
            if "/" in exe:
                found = os.path.join(job.cwd or "", exe)
                found = found if os.access(found, os.X_OK) and not os.path.isdir(found) else None
            else:
                found = shutil.which(exe, path=(env or os.environ).get("PATH", os.defpath))
            if found is None:
                raise FileNotFoundError(errno.ENOENT, "no such executable", exe)
        stdout = stderr = None
        try:
            stdout = _open_log(self.log_path(job.jid, "stdout"))
            stderr = _open_log(self.log_path(job.jid, "stderr"))
            popen = subprocess.Popen(_wrapped_argv(job, self._exits.path),
                                     stdin=subprocess.DEVNULL, stdout=stdout,
                                     stderr=stderr, cwd=job.cwd, env=env,
                                     start_new_session=True)
        finally:
            for fd in (stdout, stderr):
                if fd is not None:
                    os.close(fd)
        job.popen = popen
        job.spawned_at = _time()
        job.pid = popen.pid
        job.ident = None        # read by settle(), once the child is past exec
        job.message = "running (pid %d)" % popen.pid
        return STARTED

    def settle(self, job):
        """Called without the lock soon after start(): read the identity
        that a restarted manager will check.  Reading /proc/<pid>/stat while
        the child is still exec'ing blocks, so it is not done in start()."""
        return _identity(job.pid) if job.popen is not None else None

    def idle(self):
        """No job is running: empty the exit log (every code in it is in
        the journal by now)."""
        if os.path.getsize(self._exits.path) > EXIT_LOG_MAX:
            self._exits.clear()

    def watch(self, job):
        self._watched[job.jid] = job
        if self._selector is not None:
            job.pidfd = _pidfd(job.pid)
            if job.pidfd is not None:
                self._selector.register(job.pidfd, selectors.EVENT_READ, job)

    def unwatch(self, job):
        self._watched.pop(job.jid, None)
        if job.pidfd is not None:
            if self._selector is not None:
                self._selector.unregister(job.pidfd)
            os.close(job.pidfd)
            job.pidfd = None
        job.popen = None

    def wait(self, timeout):
        if self._selector is None:      # no pidfds: poll every job, 10 ms apart
            self._waker.sleep(POLL_INTERVAL if timeout is None else min(POLL_INTERVAL, timeout))
            return list(self._watched.values())
        jobs = []
        for key, _ in self._selector.select(timeout):
            if key.data is None:
                _drain(self._waker.r)
            else:
                jobs.append(key.data)
        return jobs

    def check(self, job):
        if job.popen is not None:
            code = job.popen.poll()
            return None if code is None else _Exit(code)
        if _is_alive(job, self._exits.path):
            return None
        code = self._exits.code(job.seq)
        try:    # our own child, from an earlier manager in this process
            pid, status = os.waitpid(job.pid, os.WNOHANG)
            if pid and code is None:
                code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            pass
        return _Exit(code)

    def signal(self, job, sig):
        if job.popen is None and not _is_alive(job, self._exits.path):
            return False        # re-adopted and gone: never signal a stranger
        try:
            os.killpg(job.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def recover(self, job):
        if job.pid and _is_alive(job, self._exits.path):
            return True
        return _Exit(self._exits.code(job.seq))

    def recover_queued(self, job):
        """A job journaled as queued may have been started by a manager
        that died before the start reached the disk: find its wrapper
        (``pman-job <seq>`` on our exit log) or its exit code, so that it
        never runs twice."""
        if self._orphans is None:       # one scan of /proc per startup
            self._orphans = {}
            exits = self._exits.path.encode()
            for name in os.listdir("/proc"):
                if name.isdigit():
                    try:
                        with open("/proc/%s/cmdline" % name, "rb") as f:
                            argv = f.read().split(b"\0")
                    except OSError:
                        continue
                    if (len(argv) > 5 and argv[3] == b"pman-job" and argv[5] == exits
                            and argv[4].isdigit() and argv[1] == b"-c"):
                        self._orphans[int(argv[4])] = int(name)
        pid = self._orphans.get(job.seq)
        if pid is not None:
            job.pid, job.ident = pid, _identity(pid)
            if _is_alive(job, self._exits.path):
                job.status, job.started = STARTED, job.submitted
                job.message = "running (pid %d), found after a restart" % pid
                return True
        code = self._exits.code(job.seq)
        if code is not None:
            job.started = job.submitted
            return _Exit(code)
        job.pid = job.ident = None
        return False

    def wake(self):
        self._waker.wake()

    def close(self):
        for job in list(self._watched.values()):
            if job.pidfd is not None:
                os.close(job.pidfd)
                job.pidfd = None
            job.popen = None        # still our child: subprocess reaps it later
        if self._selector is not None:
            self._selector.close()
        self._waker.close()


# SLURM job states -> pman statuses (the rest of the terminal states: error).
_SLURM_PENDING = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD",
                  "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED", "STOPPED"}
_SLURM_RUNNING = {"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING"}
_SLURM_ERROR = {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED", "REVOKED", "SPECIAL_EXIT"}


class SlurmBackend:
    """Jobs as SLURM batch jobs, driven through ``sbatch``, ``squeue``,
    ``sacct`` and ``scancel``.  The submit host needs SLURM's client
    commands; the state directory (logs) must be on a file system the
    compute nodes share.  One ``squeue`` call polls every active job; the
    poll interval adapts (``MIN_POLL`` after a change, up to ``MAX_POLL``
    when idle).  Timeouts are enforced by pman; ``--time`` is a backstop."""

    name = "slurm"
    resend_window = 0.0
    journal_before_start = True     # see JobManager._spawn
    MIN_POLL, MAX_POLL = 0.2, 5.0
    COMMAND_TIMEOUT = 30.0

    def __init__(self, partition=None, sbatch_args=()):
        if isinstance(sbatch_args, str):
            sbatch_args = shlex.split(sbatch_args)
        self.partition = partition
        self.sbatch_args = list(sbatch_args)
        self.log_dir = None
        self.calls = collections.Counter()   # scheduler commands run, by name

    def open(self, log_dir, log_path):
        for tool in ("sbatch", "squeue", "scancel"):
            if shutil.which(tool) is None:
                raise BackendUnavailable("the slurm backend needs %r on PATH, and it is "
                                         "missing: install SLURM's client commands" % tool)
        self.log_dir, self.log_path = log_dir, log_path
        self._waker = _Waker()
        self._watched = {}              # jid -> job
        self._states = {}   # backend_id -> (state, reason, code, signal, start)
        self._interval = self.MIN_POLL
        self._last_poll = 0.0

    def _run(self, argv, check=True):
        self.calls[argv[0]] += 1
        try:
            out = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                 text=True, timeout=self.COMMAND_TIMEOUT)
        except FileNotFoundError:
            raise BackendUnavailable("%s is not installed" % argv[0]) from None
        except subprocess.TimeoutExpired:
            raise BackendUnavailable("%s did not answer within %g s: is slurmctld up?"
                                     % (argv[0], self.COMMAND_TIMEOUT)) from None
        if check and out.returncode != 0:
            message = (out.stderr or out.stdout).strip() or "exit status %d" % out.returncode
            if any(s in message for s in ("Unable to contact", "Socket timed out",
                                          "Connection refused", "Zero Bytes")):
                raise BackendUnavailable("%s: %s" % (argv[0], message))
            raise SubmitRejected("%s: %s" % (argv[0], message))
        return out

    def start(self, job, env):
        if job.cwd is not None and not os.path.isdir(job.cwd):
            raise FileNotFoundError(errno.ENOENT, "no such directory (cwd)", job.cwd)
        argv = ["sbatch", "--parsable", "-J", job.jid,
                "-o", self.log_path(job.jid, "stdout"), "-e", self.log_path(job.jid, "stderr")]
        if job.cwd is not None:
            argv += ["--chdir", job.cwd]
        if self.partition:
            argv += ["--partition", self.partition]
        extras = job.extras or {}
        cpu, mem = extras.get("cpu_limit"), extras.get("memory_limit")
        if isinstance(cpu, (int, float)) and not isinstance(cpu, bool) and cpu > 0:
            argv.append("--cpus-per-task=%d" % math.ceil(cpu / 1000))
        if isinstance(mem, (int, float)) and not isinstance(mem, bool) and mem > 0:
            argv.append("--mem=%dM" % math.ceil(mem))
        if job.timeout is not None:     # a backstop: pman kills at the timeout itself
            argv.append("--time=%d" % (math.ceil(job.timeout / 60) + 1))
        if env:
            # --export splits on commas: values travel in a NUL-separated file.
            path = os.path.join(self.log_dir, job.jid + ".env")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write("".join("%s=%s\0" % kv for kv in env.items()))
            argv.append("--export-file=" + path)
        argv += self.sbatch_args
        argv += ["--wrap", job.cmd if job.argv is None else shlex.join(job.argv)]
        out = self._run(argv)
        job_id = out.stdout.strip().split(";")[0]
        if not job_id.isdigit():
            raise SubmitRejected("sbatch printed no job id: %r" % out.stdout[:200])
        job.backend_id = job_id
        job.message = "submitted to SLURM as job %s" % job_id
        self._interval = self.MIN_POLL
        return NOTSTARTED

    def settle(self, job):
        return None

    def idle(self):
        pass

    def watch(self, job):
        self._watched[job.jid] = job
        self._interval = self.MIN_POLL
        self.wake()

    def unwatch(self, job):
        self._watched.pop(job.jid, None)
        self._states.pop(job.backend_id, None)
        try:
            os.unlink(os.path.join(self.log_dir, job.jid + ".env"))
        except FileNotFoundError:
            pass

    def poll(self, ids):
        """{id: (state, reason, code, signal)} for *ids*, in one squeue call
        (and one sacct call for jobs squeue has forgotten)."""
        found = {}
        if not ids:
            return found
        out = self._run(["squeue", "-t", "all", "-h", "-j", ",".join(ids),
                         "-O", "JobID:|,State:|,Reason:|,exit_code:|,StartTime:"], check=False)
        if out.returncode != 0 and "Invalid job id" not in out.stderr:
            raise BackendUnavailable("squeue: %s" % out.stderr.strip())
        for line in out.stdout.splitlines():
            fields = [f.strip() for f in line.split("|")]
            if len(fields) >= 5 and fields[0] in ids:
                status = int(fields[3]) if fields[3].isdigit() else None
                code = sig = None
                if status is not None:
                    code, sig = (status >> 8) & 0xff, status & 0x7f
                found[fields[0]] = (fields[1], fields[2], code, sig, fields[4])
        missing = [i for i in ids if i not in found]
        if missing and shutil.which("sacct"):
            out = self._run(["sacct", "-c", "-n", "-P", "-j", ",".join(missing),
                             "-o", "JobID,State,ExitCode,Start"], check=False)
            for line in out.stdout.splitlines():
                fields = line.split("|")
                if len(fields) >= 4 and fields[0] in missing:
                    state = fields[1].split()[0] if fields[1] else "UNKNOWN"
                    code, _, sig = fields[2].partition(":")
                    found[fields[0]] = (state, "", int(code or 0), int(sig or 0), fields[3])
        return found

    @staticmethod
    def _started(job, stamp):
        """SLURM's local start "2026-11-28T06:34:26" as pman's UTC ISO 8601,
        never before the submission (SLURM's clock has whole seconds)."""
        try:
            start = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S").astimezone(timezone.utc)
        except ValueError:      # N/A, Unknown
            return _now()
        if job.submitted:
            start = max(start, datetime.fromisoformat(job.submitted))
        return start.isoformat()

    def wait(self, timeout):
        due = self._last_poll + self._interval - _time()
        self._waker.sleep(max(0.0, due if timeout is None else min(due, timeout)))
        if _time() < self._last_poll + self.MIN_POLL:
            return []           # woken early: never poll faster than MIN_POLL
        self._last_poll = _time()
        jobs = list(self._watched.values())
        ids = [j.backend_id for j in jobs if j.backend_id]
        try:
            states = self.poll(ids)
        except BackendUnavailable as e:
            log.warning("polling SLURM failed (will retry): %s", e)
            self._interval = self.MAX_POLL
            return []
        # A change of state, reason or code; not of a pending job's estimated
        # start time, which the backfill scheduler rewrites all the time.
        changed = [j for j in jobs if (states.get(j.backend_id) or ())[:4]
                   != (self._states.get(j.backend_id) or ())[:4]]
        self._states.update(states)
        self._interval = (self.MIN_POLL if changed
                          else min(self.MAX_POLL, self._interval * 1.5))
        return changed

    def check(self, job):
        got = self._states.get(job.backend_id)
        if got is None:
            return None
        state, reason, code, sig, start = got
        base = state.split()[0].rstrip("+")
        if base in _SLURM_PENDING:
            message = "pending in SLURM as job %s (%s)" % (
                job.backend_id, reason if reason and reason != "None" else base)
            changed = job.message != message
            job.message = message
            return "changed" if changed else None
        if base in _SLURM_RUNNING:
            if job.status == STARTED:
                return None
            job.status, job.started = STARTED, self._started(job, start)
            job.message = "running in SLURM as job %s" % job.backend_id
            return "started"
        if job.started is None:     # it ran between two polls
            job.started = self._started(job, start)
        what = "SLURM job %s %s%s" % (job.backend_id, base,
                                      " (%s)" % reason if reason and reason != "None" else "")
        if base == "COMPLETED" and code == 0 and not sig:
            return _Exit(0, SUCCESS, "%s: exited with code 0" % what)
        if base in _SLURM_ERROR or base == "COMPLETED":
            if sig:
                return _Exit(-sig, ERROR, "%s: ended by %s" % (what, signal_name(sig)))
            if base == "CANCELLED" or code is None or (base != "FAILED" and code == 0):
                return _Exit(None, ERROR, "%s: no exit code is known" % what)
            return _Exit(code, ERROR, "%s: exited with code %d" % (what, code))
        return _Exit(None, UNDEFINED, "%s: unknown SLURM state" % what)

    def signal(self, job, sig):
        if not job.backend_id:
            return False
        if sig == signal.SIGKILL or job.status != STARTED:
            # A pending job cannot take a signal (scancel retries for a
            # minute): it never ran, so cancel it outright.
            self._run(["scancel", job.backend_id])
        else:   # without --full the batch shell itself is not signalled
            self._run(["scancel", "--full", "--signal=%s" % signal_name(sig)[3:],
                       job.backend_id])
        self._interval = self.MIN_POLL      # confirm the outcome from SLURM, soon
        self.wake()
        return True

    def recover_queued(self, job):
        return False        # queued in pman: never reached SLURM

    def recover(self, job):
        if not job.backend_id:
            # A crash between sbatch and saving its id: find the job by name,
            # submitted no earlier than the record says.
            out = self._run(["squeue", "-t", "all", "-h", "--name", job.jid,
                             "-O", "JobID:|,SubmitTime:"], check=False)
            since = (datetime.fromisoformat(job.submitted).astimezone()
                     .strftime("%Y-%m-%dT%H:%M:%S") if job.submitted else "")
            ids = [f.split("|")[0].strip() for f in out.stdout.splitlines()
                   if f.split("|")[-1].strip() >= since]
            if not ids:
                return False            # never submitted: queue it again
            job.backend_id = max(ids, key=int)
        return True

    def wake(self):
        self._waker.wake()

    def close(self):
        self._waker.close()


def _make_backend(backend):
    if backend is None or backend == "local":
        return LocalBackend()
    if backend == "slurm":
        return SlurmBackend()
    if isinstance(backend, (LocalBackend, SlurmBackend)):
        return backend
    raise InvalidArgument("backend must be 'local', 'slurm' or a backend object, not %r"
                          % (backend,))


# ---------------------------------------------------------------------------
# JobManager
# ---------------------------------------------------------------------------

def default_state_dir():
    """``$PMAN_STATE_DIR``, else ``$XDG_STATE_HOME/pman``, else
    ``~/.local/state/pman``."""
    if os.environ.get("PMAN_STATE_DIR"):
        return os.environ["PMAN_STATE_DIR"]
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "pman")


_registry = {}                      # realpath -> open JobManager
_registry_lock = threading.Lock()   # guards _registry and JobManager._refs


class JobManager:
    """Runs and tracks jobs whose state lives in *state_dir*.

    Options (keyword-only):

    - ``max_running``: run at most this many jobs at once; others wait as
      ``notstarted`` and start in submission order (default: unlimited);
    - ``grace``: seconds between a kill's signal and the SIGKILL (5);
    - ``log_limit``: a job whose stdout or stderr grows past this many bytes
      is killed, with a message saying so (default: no limit);
    - ``keep_finished``: forget the oldest finished jobs, and their logs,
      past this many (default: keep all);
    - ``env``: variables merged over ``os.environ`` for every job;
    - ``on_end``: ``callback(job)`` called with the record of each job that
      ends, outside any lock, from the reaper thread;
    - ``durable``: True (default) makes ``run()`` return only once the job
      is on disk; False lets the reaper fsync within ``FLUSH_DELAY``;
    - ``strict``: refuse to start on a damaged state file instead of moving
      it aside.

    Opening the same directory twice in one process returns the same
    manager (the options must agree).  Another process holding the
    directory raises `StateLocked`.
    """

    def __new__(cls, state_dir=None, **options):
        path = os.path.realpath(os.path.abspath(os.path.expanduser(
            state_dir if state_dir is not None else default_state_dir())))
        with _registry_lock:
            self = _registry.get(path)
        if self is None:
            self = super().__new__(cls)
            self._path = path
            self._refs = 0
            self._options = None
        return self

    def __init__(self, state_dir=None, *, max_running=None, grace=DEFAULT_GRACE,
                 log_limit=None, keep_finished=None, env=None, on_end=None,
                 durable=True, strict=False, backend="local"):
        options = dict(max_running=max_running, grace=grace, log_limit=log_limit,
                       keep_finished=keep_finished, env=env, on_end=on_end,
                       durable=durable, strict=strict, backend=backend)
        with _registry_lock:
            if self._options is not None:
                if options != self._options:
                    raise PmanError("state directory %s is already open in this "
                                    "process with other options" % self._path)
                self._refs += 1
                return
            if max_running is not None and (isinstance(max_running, bool) or not
                                            isinstance(max_running, int) or max_running < 1):
                raise InvalidArgument("max_running must be a positive integer or None")
            _check_number("grace", grace, allow_none=False)
            for name, value in (("log_limit", log_limit), ("keep_finished", keep_finished)):
                if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                          or value < 0):
                    raise InvalidArgument("%s must be a non-negative integer or None" % name)
            self.max_running = max_running
            self.grace = float(grace)
            self.log_limit = log_limit
            self.keep_finished = keep_finished
            self.env = _check_env(env)
            self.on_end = on_end
            self.durable = durable
            self.backend = _make_backend(backend)
            self.state_dir = self._path
            self.log_dir = os.path.join(self._path, "logs")
            self._open(strict)
            self._options = options
            self._refs = 1
            _registry[self._path] = self

    # -- opening and closing ----------------------------------------------

    def _open(self, strict):
        os.makedirs(self.log_dir, mode=0o700, exist_ok=True)
        os.chmod(self._path, 0o700)
        self._lock_fd = self._take_lock()
        self._store = self._reaper = None
        self._backend_open = False
        try:
            self._open_locked(strict)
        except BaseException:       # leave nothing held: the lock, files, threads
            if self._reaper is None:
                if self._store is not None:
                    self._store.close()
                if self._backend_open:
                    self.backend.close()
                os.close(self._lock_fd)
            raise

    def _open_locked(self, strict):
        self._store = _Store(self._path, strict=strict)
        lines, self._next_seq, replayed = self._store.load()
        self._lock = threading.Lock()       # guards all job state below
        self._changed = threading.Condition(self._lock)   # a job ended
        self._jobs = lines                  # jid -> _Job | line; submission order
        self._queue = collections.deque()   # queued _Jobs, submission order
        self._running = {}                  # jid -> started _Job
        self._timers = []                   # heap of (when, n, kind, jid)
        self._timer_n = 0
        self._ended = []                    # records for on_end, reaper only
        self._flush_due = None
        self._closing = False
        self._compact_lock = threading.Lock()   # one compaction at a time
        self.backend.open(self.log_dir, self._log_path)
        self._backend_open = True
        self._finished = 0
        self._end_order = collections.deque()   # (jid, line) in order of ending
        # Replay: finished jobs stay lines; the active ones become _Jobs.
        active = self._store.active
        self._end_order.extend((jid, line) for jid, line in lines.items()
                               if jid not in active)
        self._finished = len(self._end_order)
        for jid in active:
            self._jobs[jid] = _Job(**json.loads(lines[jid]))
        self._store.open_journal(self._store.generation + 1 if replayed else
                                 self._store.generation)
        with self._lock:
            self._recover()
        self._store.sync()
        if replayed:        # fold the replayed journals into a fresh snapshot
            self._compact_now()
        self._reaper = threading.Thread(target=self._reap_loop, name="pman-reaper",
                                        daemon=True)
        self._reaper.start()

    def _take_lock(self):
        path = os.path.join(self._path, "lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = _time() + LOCK_RETRY
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
            try:
                holder = int(os.pread(fd, 32, 0).decode().strip() or 0) or None
            except ValueError:
                holder = None
            # A dead holder's job may be between fork and exec, still holding
            # a copy of the lock fd for a moment: wait that moment out.
            if holder is None or _pid_exists(holder) or _time() > deadline:
                os.close(fd)
                raise StateLocked(self._path, holder)
            threading.Event().wait(0.02)
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"%d\n" % os.getpid(), 0)
        return fd

    def close(self, *, kill=False):
        """Release this handle.  When the last handle of the directory is
        closed (or always with ``kill=True``): with ``kill=True``, cancel
        queued jobs and kill running ones (signal, grace, SIGKILL) and wait
        for them; flush state, stop the reaper and release the directory.
        Without kill, running jobs keep running and the next manager
        re-adopts them; queued jobs stay queued."""
        self._not_from_reaper("close()")
        with _registry_lock:
            if self._options is None:
                return
            self._refs -= 1
            if self._refs > 0 and not kill:
                return
            self._options = None
            _registry.pop(self._path, None)
        if kill:
            with self._lock:
                for job in list(self._queue):
                    self._cancel(job, "cancelled: the manager was closed")
                active = list(self._running)
            for jid in active:
                try:
                    self.kill(jid)
                except PmanError:
                    pass
            try:
                self.wait(active, timeout=self.grace + 5)
            except Timeout:
                log.warning("jobs still running after the kill at close: %s", active)
        with self._lock:
            self._closing = True
        self._wake()
        self._reaper.join()
        self._flush()
        self._compact_now()
        self._store.close()
        self.backend.close()
        os.close(self._lock_fd)

    shutdown = close

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return "<JobManager %s>" % self._path

    # -- public API ---------------------------------------------------------

    def run(self, cmd, *, jid=None, auid="", meta=None, env=None, cwd=None,
            timeout=None, extras=None):
        """Start a job and return its record (a dict snapshot).

        *cmd* is a shell command string, or a list of strings run as argv
        without a shell.  *jid* defaults to a generated id.  *env* (a dict,
        or a list of "KEY=value") is merged over the manager's environment;
        *cwd* must exist; *timeout* (s) counts from the start; *meta* is
        any JSON object stored with the job; *extras* holds recorded-only
        fields (pfcon's resource limits).

        The job is spawned before this returns unless ``max_running`` jobs
        are running, in which case it is queued.  A spawn failure is not an
        exception: the job ends ``finishedWithError`` with the error in its
        message.  Raises InvalidArgument, or JobConflict if *jid* is queued
        or running.
        """
        if isinstance(cmd, str):
            if not cmd.strip():
                raise InvalidArgument("cmd must be a non-empty string")
            argv, display = None, cmd
        elif isinstance(cmd, (list, tuple)) and cmd and all(isinstance(a, str) for a in cmd):
            argv, display = list(cmd), shlex.join(cmd)
        else:
            raise InvalidArgument("cmd must be a shell string or a non-empty list of strings")
        if "\0" in display:
            raise InvalidArgument("cmd must not contain NUL bytes")
        if auid is None:
            auid = ""
        if not isinstance(auid, str):
            raise InvalidArgument("auid must be a string")
        if meta is None:
            meta = {}
        if not isinstance(meta, dict):
            raise InvalidArgument("meta must be a JSON object (dict)")
        if extras is not None and not isinstance(extras, dict):
            raise InvalidArgument("extras must be a dict")
        env = _check_env(env)
        if cwd is not None and not isinstance(cwd, str):
            raise InvalidArgument("cwd must be a string")
        _check_number("timeout", timeout)
        # Checked before anything is created: what is stored must also be
        # listable, searchable and serializable in any thread, so the depth
        # stays far from the recursion limit.
        for name, value in (("meta", meta), ("extras", extras)):
            if not _depth_ok(value, MAX_DEPTH):
                raise InvalidArgument("%s is nested too deeply: at most %d levels"
                                      % (name, MAX_DEPTH))
        try:
            json.dumps([meta, extras], allow_nan=False)
        except (TypeError, ValueError) as e:
            raise InvalidArgument("meta is not storable as JSON: %s" % (
                "NaN and infinite numbers are not JSON" if isinstance(e, ValueError)
                else e)) from None
        with self._lock:
            self._check_open()
            if jid is None:
                jid = "job-%d-%d" % (self._next_seq, os.getpid())
                while jid in self._jobs:
                    self._next_seq += 1
                    jid = "job-%d-%d" % (self._next_seq, os.getpid())
            check_jid(jid)
            old = self._jobs.get(jid)
            if old is not None and _entry_status(old) in ACTIVE:
                raise JobConflict(jid, "job %s is %s: kill it or wait for it before "
                                  "running the jid again" % (jid, _entry_status(old)))
            if old is not None:
                del self._jobs[jid]         # re-run: replaces, moves to the end
                self._finished -= 1
                self._unlink(jid)           # no output of the old run may show

            job = _Job(jid=jid, status=NOTSTARTED, seq=self._next_seq,
                       message="queued: waiting for a free slot", cmd=display,
                       argv=argv, auid=auid, meta=meta, env=env, cwd=cwd,
                       timeout=timeout, extras=extras or {}, submitted=_now())
            try:
                job.line()
            except (RecursionError, ValueError, TypeError) as e:
                raise InvalidArgument("meta or extras cannot be stored: %s"
                                      % ("nested too deeply" if isinstance(e, RecursionError)
                                         else e)) from None
            self._next_seq += 1
            self._jobs[jid] = job
            if self.max_running is None or len(self._running) < self.max_running:
                try:
                    self._spawn(job, raise_backend_errors=True)
                except PmanError:
                    del self._jobs[jid]     # refused: nothing was run or recorded
                    if job.backend_id == "":        # undo the journaled intent
                        self._store.append(json.dumps({"forget": [jid]}))
                    if old is not None:
                        self._jobs[jid] = old
                        self._finished += 1
                        if job.backend_id == "":
                            self._store.append(old)
                    raise
            else:
                self._queue.append(job)
                self._persist(job)
            snapshot = self._public(_record(job))
            ticket = self._ticket
            if not self.durable and self._flush_due is None:
                self._flush_due = _time() + FLUSH_DELAY     # the reaper syncs soon
                self._wake()
        if self.durable:
            self._store.sync(ticket)
        self._settle([job])
        self._maybe_compact()
        return snapshot

    def get(self, jid, *, with_logs=False):
        """The record of job *jid* (JobNotFound if none).  With
        ``with_logs=True`` it also holds ``logs``: the tail of stdout then
        stderr (at most 1,000 lines and 64 KiB)."""
        with self._lock:
            entry = self._jobs.get(jid) if isinstance(jid, str) else None
            if entry is None:
                raise JobNotFound(jid)
            record = self._public(_record(entry))
        if with_logs:
            record["logs"] = self.tail(jid)
        return record

    def jobs(self, *, status=None, auid=None, meta=None, limit=None, after=None):
        """Records of jobs in submission order, filtered by *status* (one
        string or several), *auid* and *meta* (every key must be equal).
        *after* is a jid: list only jobs submitted after it.  *limit* caps
        the count."""
        if isinstance(status, str):
            status = (status,)
        if status is not None:
            for s in status:
                if s not in STATUSES:
                    raise InvalidArgument("unknown status %r: one of %s" % (s, ", ".join(STATUSES)))
        if meta is not None and not isinstance(meta, dict):
            raise InvalidArgument("meta filter must be a dict")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise InvalidArgument("limit must be a non-negative integer")
        out = []
        with self._lock:    # finished jobs are immutable lines: copy the rest
            entries = [(jid, e if isinstance(e, str) else e.line())
                       for jid, e in self._jobs.items()]
        started = after is None
        for jid, entry in entries:
            if not started:
                started = jid == after
                continue
            if limit is not None and len(out) >= limit:
                break
            if status is not None and _LINE_RE.match(entry).group(2) not in status:
                continue
            record = json.loads(entry)
            if auid is not None and record["auid"] != auid:
                continue
            if meta and any(record["meta"].get(k, _MISSING) != v for k, v in meta.items()):
                continue
            out.append(self._public(record))
        if not started:
            raise JobNotFound(after)
        return out

    def wait(self, jids, timeout=None):
        """Wait until job *jids* (one jid, or a list) has ended; return its
        record (a list of records for a list).  Raises Timeout after
        *timeout* seconds, with the current records in ``.jobs``."""
        self._not_from_reaper("wait()")
        single = isinstance(jids, str)
        wanted = [jids] if single else list(jids)
        _check_number("timeout", timeout)
        deadline = None if timeout is None else _time() + timeout
        with self._lock:
            while True:
                entries = []
                for jid in wanted:
                    entry = self._jobs.get(jid)
                    if entry is None:
                        raise JobNotFound(jid)
                    entries.append(entry)
                pending = [e for e in entries if not isinstance(e, str)]
                if not pending:
                    break
                left = None if deadline is None else deadline - _time()
                if left is not None and left <= 0:
                    records = [self._public(_record(e)) for e in entries]
                    raise Timeout("jobs still running after %s s: %s" % (
                        timeout, ", ".join(j.jid for j in pending)),
                        records[0] if single else records)
                self._changed.wait(left)
            records = [self._public(_record(e)) for e in entries]
        return records[0] if single else records

    def read_log(self, jid, stream="stdout", *, offset=0, limit=None):
        """Read a job's output: ``{"jid", "stream", "offset", "next_offset",
        "eof", "data"}`` with *data* the bytes from *offset* (at most
        *limit*).  ``eof`` is True once the job has ended and no more bytes
        follow, so a follower loops until it."""
        if stream not in ("stdout", "stderr"):
            raise InvalidArgument("stream must be 'stdout' or 'stderr', not %r" % (stream,))
        for name, value in (("offset", offset), ("limit", limit)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise InvalidArgument("%s must be a non-negative integer" % name)
        with self._lock:
            entry = self._jobs.get(jid) if isinstance(jid, str) else None
            if entry is None:
                raise JobNotFound(jid)
            ended = isinstance(entry, str)
        data = b""
        more = False
        try:
            with open(self._log_path(jid, stream), "rb") as f:
                left = os.fstat(f.fileno()).st_size - offset
                if left > 0:    # never seek past the end: 2**44 is EINVAL on ext4
                    f.seek(offset)
                    data = f.read(left if limit is None else min(limit, left))
                    more = bool(f.read(1))
        except FileNotFoundError:
            pass
        return {"jid": jid, "stream": stream, "offset": offset,
                "next_offset": offset + len(data), "eof": ended and not more,
                "data": data}

    def kill(self, jid, signal=signal.SIGTERM, *, grace=None):
        """Send *signal* (a number or a name) to the job's process group and
        return its record.  If the job is still running *grace* seconds
        later (default: the manager's), the reaper sends SIGKILL.  A queued
        job is cancelled; a finished job is left alone."""
        sig = parse_signal(signal)
        grace = self.grace if grace is None else _check_number("grace", grace, False)
        with self._lock:
            job = self._active(jid)
            if job is not None and jid not in self._running:
                self._cancel(job, "cancelled before it started (killed on request)")
            elif job is not None:
                self._signal(job, sig, "on request", grace)
            record = self._public(_record(self._jobs[jid]))
            ticket = self._ticket
        self._store.sync(ticket)
        return record

    def remove(self, jid, *, kill=False):
        """Forget job *jid* and delete its logs.  A queued or running job
        raises JobConflict unless ``kill=True``, which kills it first and
        waits for it (up to the grace period plus 5 s)."""
        with self._lock:
            job = self._active(jid)
        if job is not None:
            if not kill:
                raise JobConflict(jid, "job %s is %s: pass kill=True to kill it first"
                                  % (jid, job.status))
            self.kill(jid)
            self.wait(jid, timeout=self.grace + 5)
        self._forget([jid])

    def forget(self, *, keep=0):
        """Forget finished jobs and their logs, oldest first, keeping the
        *keep* most recent.  Queued and running jobs are never forgotten.
        Returns the number forgotten."""
        _check_number("keep", keep, False)
        with self._lock:
            count = self._finished - keep
        return self._forget(oldest=count) if count > 0 else 0

    def flush(self):
        """Make every change so far durable, and compact the journal."""
        self._flush()
        self._compact_now()

    def etag(self, jid):
        """A string that changes whenever the record of *jid* changes, or
        None while the job is queued or running (its record changes on its
        own).  JobNotFound if there is no such job."""
        with self._lock:
            entry = self._jobs.get(jid) if isinstance(jid, str) else None
            if entry is None:
                raise JobNotFound(jid)
            if not isinstance(entry, str):
                return None
            m = _LINE_RE.match(entry)
            return "%s-%s-%d" % (m.group(3), m.group(2), len(entry))

    def jids(self):
        """Every jid, in submission order."""
        with self._lock:
            return list(self._jobs)

    def nth(self, index):
        """The record of the job at 0-based *index* in submission order."""
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise InvalidArgument("index must be a non-negative integer")
        with self._lock:
            if index >= len(self._jobs):
                raise JobNotFound("_%d" % index)
            entry = next(itertools.islice(self._jobs.values(), index, None))
            return self._public(_record(entry))

    def find(self, key, value):
        """Records of the jobs whose field *key*, or meta key *key*, equals
        *value* (compared as strings too, for clients that send "3" for 3)."""
        if not isinstance(key, str) or not key:
            raise InvalidArgument("key must be a non-empty string")
        if key == "jid":
            with self._lock:
                entry = self._jobs.get(value) if isinstance(value, str) else None
                return [] if entry is None else [self._public(_record(entry))]
        hits = []
        for record in self.jobs():
            for source in (record, record["meta"]):
                if key in source and (source[key] == value or
                                      str(source[key]) == str(value)):
                    hits.append(record)
                    break
        return hits

    def tail(self, jid, stream=None):
        """The end of a job's output as text (at most 1,000 lines and 64
        KiB): *stream* "stdout" or "stderr", or None for both, in order."""
        if stream not in (None, "stdout", "stderr"):
            raise InvalidArgument("stream must be 'stdout', 'stderr' or None")
        with self._lock:
            if not isinstance(jid, str) or jid not in self._jobs:
                raise JobNotFound(jid)
        parts = []
        for name in ((stream,) if stream else ("stdout", "stderr")):
            try:
                with open(self._log_path(jid, name), "rb") as f:
                    size = f.seek(0, os.SEEK_END)
                    f.seek(max(0, size - TAIL_BYTES))
                    parts.append(f.read())
            except OSError:
                pass
        text = b"".join(parts)[-TAIL_BYTES:].decode("utf-8", "replace")
        # The text after a final newline is not a line: keep 1,000 before it.
        keep = TAIL_LINES + 1 if text.endswith("\n") else TAIL_LINES
        return "\n".join(text.split("\n")[-keep:])

    def reload(self):
        """Make every change durable, then re-read finished jobs from the
        state directory (snapshot and journals) and settle any running job
        whose process is gone.  A finished job whose record on disk differs
        (same run) takes the disk's record; running and queued jobs are
        untouched.  Returns `counts()`."""
        # Not flush(): a compaction would overwrite the disk with memory
        # before it is read.
        self._flush()
        with self._compact_lock, self._lock:
            self._store.sync()      # endings since flush(): disk must not be older
            disk, _, _ = _Store(self._path, strict=True).load()
            replaced = {}
            for jid, line in disk.items():
                old = self._jobs.get(jid)
                m, n = _LINE_RE.match(line), _LINE_RE.match(old) if isinstance(old, str) else None
                if (n is not None and old != line and m.group(2) not in ACTIVE
                        and m.group(3) == n.group(3)):
                    self._jobs[jid] = line
                    replaced[jid] = old
            if replaced:
                self._end_order = collections.deque(
                    (jid, self._jobs[jid] if replaced.get(jid) is line else line)
                    for jid, line in self._end_order)
            for job in list(self._running.values()):
                self._collect_safely(job)
        return self.counts()

    def counts(self):
        """``{status: number of jobs}`` for all five statuses."""
        counts = dict.fromkeys(STATUSES, 0)
        with self._lock:
            for entry in self._jobs.values():
                counts[_entry_status(entry)] += 1
        return counts

    # -- internals: records and files ---------------------------------------
    # Methods named _x_locked or documented "caller holds self._lock" MUST be
    # called with self._lock held.

    def _not_from_reaper(self, what):
        if threading.current_thread() is self._reaper:
            raise PmanError("%s cannot be called from on_end: the callback runs on the "
                            "reaper thread, which it would block" % what)

    def _check_open(self):
        if self._closing or self._options is None:
            raise PmanError("the manager for %s is closed" % self._path)

    def _active(self, jid):
        """The _Job for *jid* if queued or running, None if finished.
        Caller holds self._lock."""
        entry = self._jobs.get(jid) if isinstance(jid, str) else None
        if entry is None:
            raise JobNotFound(jid)
        return None if isinstance(entry, str) else entry

    def _log_path(self, jid, stream):
        return os.path.join(self.log_dir, jid + (".out" if stream == "stdout" else ".err"))

    def _public(self, record):
        """The caller's view of a record: env values hidden, paths added."""
        record["env"] = sorted(record["env"] or ())
        record["stdout"] = self._log_path(record["jid"], "stdout")
        record["stderr"] = self._log_path(record["jid"], "stderr")
        record["timestamp"] = record["ended"] or record["started"] or record["submitted"]
        for key in ("ident", "kill_signal", "kill_reason"):
            del record[key]
        return record

    def _unlink(self, jid, suffixes=(".out", ".err")):
        for suffix in suffixes:
            try:
                os.unlink(os.path.join(self.log_dir, jid + suffix))
            except FileNotFoundError:
                pass

    @property
    def _ticket(self):
        return self._store._appended

    def _persist(self, job):
        """Journal the job's current state.  Caller holds self._lock."""
        self._store.append(job.line())

    def _forget(self, jids=(), *, oldest=0):
        """Forget finished *jids*, or the *oldest* finished jobs."""
        with self._lock:
            if oldest > 0:
                jids = self._oldest_finished(oldest)
            gone = []
            for jid in jids:
                entry = self._jobs.get(jid)
                if isinstance(entry, str):
                    del self._jobs[jid]
                    self._finished -= 1
                    gone.append(jid)
                elif entry is None:
                    raise JobNotFound(jid)
            if not gone:
                return 0
            self._store.append(json.dumps({"forget": gone}))
            ticket = self._ticket
        self._store.sync(ticket)
        with self._lock:            # a jid run again meanwhile keeps its new logs
            for jid in gone:
                if jid not in self._jobs:
                    self._unlink(jid)
        return len(gone)

    def _oldest_finished(self, count):
        """The *count* jobs that finished first (by end, not submission, so
        a job that just ended is never the next forgotten).  Caller holds
        self._lock."""
        doomed = []
        order = self._end_order
        while order and len(doomed) < count:
            jid, line = order.popleft()
            if self._jobs.get(jid) is line:     # else re-run or forgotten since
                doomed.append(jid)
        return doomed

    # -- internals: process lifecycle -----------------------------------------

    def _spawn(self, job, raise_backend_errors=False):
        """Hand *job* to the backend now.  A job that cannot start ends
        finishedWithError, except that a backend's own refusal is raised
        to a caller of run() (*raise_backend_errors*).  Caller holds
        self._lock."""
        job.started = _now()
        env = None
        if self.env or job.env:
            env = dict(os.environ)
            env.update(self.env or ())
            env.update(job.env or ())
        if self.backend.journal_before_start:
            # Submitting to a remote scheduler: journal the intent first, so
            # that a crash before the id is saved is looked up by name at
            # recovery, never submitted twice.
            job.backend_id = ""
            self._persist(job)
            self._store.sync()
        try:
            job.status = self.backend.start(job, env)
        except (BackendUnavailable, SubmitRejected) as e:
            if raise_backend_errors:
                raise
            self._finish(job, ERROR, None, "submit failed: %s" % e, started=False)
            return
        except Exception as e:     # EMFILE, EAGAIN, ENOSPC, ENOENT...: this job only
            self._finish(job, ERROR, None, "spawn failed: %s" % e, started=False)
            return
        if job.status != STARTED:
            job.started = None
        self._running[job.jid] = job
        self.backend.watch(job)
        self._watch(job)
        self._persist(job)

    def _watch(self, job):
        """Set the timers of a job the backend now holds.  Caller holds
        self._lock."""
        self._timeout_timer(job)
        if self.log_limit is not None:
            self._timer(LOG_CHECK_EVERY, "logcheck", job)
        if job.kill_signal and job.kill_signal != signal.SIGKILL:
            job.escalate_at = _time() + self.grace    # a kill sent before a restart
            self._timer(self.grace, "escalate", job)

    def _timeout_timer(self, job):
        """A timeout counts from the job's start (SLURM: leaving the queue).
        Caller holds self._lock."""
        if job.timeout is not None and job.started is not None:
            elapsed = max(0.0, _time_since(job.started))
            self._timer(job.timeout - elapsed, "timeout", job)

    def _timer(self, delay, kind, job):
        """Arm a timer for this run of *job* (a re-run of its jid has
        another seq, so timers of an earlier run never touch it)."""
        self._timer_n += 1
        heapq.heappush(self._timers, (_time() + delay, self._timer_n, kind, job.jid, job.seq))
        self._wake()

    def _wake(self):
        self.backend.wake()

    def _signal(self, job, sig, reason, grace):
        """Signal the job's process group, having journaled why first, so a
        restarted manager still reports -sig.  A job that has already exited
        is collected instead, with its real code.  Caller holds self._lock."""
        self._collect(job)
        if self._running.get(job.jid) is not job:
            return
        if not job.kill_signal:
            job.kill_reason = reason
        job.kill_signal = sig
        self._persist(job)
        self._store.sync()     # the reason is on disk before the signal is sent
        if not self.backend.signal(job, sig):
            return
        if sig != signal.SIGKILL:
            job.escalate_at = _time() + grace
            self._timer(grace, "escalate", job)
            if (job.spawned_at is not None
                    and _time() - job.spawned_at < self.backend.resend_window):
                # The wrapper's subshell inherits its TERM handler for an
                # instant after the fork; a signal landing then is caught
                # and lost.  Once that instant is over, say it again.
                self._timer(RESEND_DELAY, "resend", job)

    def _cancel(self, job, message):
        """Caller holds self._lock."""
        try:
            self._queue.remove(job)
        except ValueError:
            pass
        self._finish(job, ERROR, None, message, started=False)

    def _finish(self, job, status, returncode, message, started=True):
        """Record the end of *job*.  Caller holds self._lock."""
        job.status, job.returncode, job.message = status, returncode, message
        job.ended = _now()
        if not started:
            job.started = None
        if self._running.pop(job.jid, None) is not None:
            self.backend.unwatch(job)
        line = job.line()
        self._jobs[job.jid] = line
        self._finished += 1
        self._end_order.append((job.jid, line))
        if len(self._end_order) > 2 * self._finished + 1000:    # drop stale pairs
            self._end_order = collections.deque(
                p for p in self._end_order if self._jobs.get(p[0]) is p[1])
        self._store.append(line)
        self._ended.append(job.jid)
        job.popen = None
        if self._flush_due is None:
            self._flush_due = _time() + FLUSH_DELAY
            self._wake()
        self._changed.notify_all()

    def _outcome(self, job, end):
        """Finish *job* given how the backend says it ended (an _Exit: the
        code its wrapper reported, None if none survives).  Caller holds
        self._lock."""
        code = end.code
        if job.kill_signal:
            sig = job.kill_signal
            if job.kill_reason == "on request":
                why = "killed by %s on request" % signal_name(sig)
            else:
                why = "%s (%s)" % (job.kill_reason, signal_name(sig))
            if end.message:     # what the backend saw, e.g. SLURM's final state
                why += "; " + end.message
            if job.status == NOTSTARTED:    # still in the backend's queue: cancelled
                self._finish(job, ERROR, None, "cancelled before it started (%s)" % why,
                             started=False)
            else:
                self._finish(job, ERROR, -sig, why)
        elif end.status is not None:
            self._finish(job, end.status, code, end.message)
        elif code is None:
            self._finish(job, UNDEFINED, None, "the job ended while no manager was "
                         "watching and left no exit code")
        elif code < 0:       # the wrapper itself died of a signal pman did not send
            sig = -code
            status, code, message = _describe_exit(128 + sig)
            self._finish(job, status, code, "killed by %s (not sent by pman); %s"
                         % (signal_name(sig), message))
        else:
            self._finish(job, *_describe_exit(code))

    def _collect(self, job):
        """The backend says *job* may have changed.  Caller holds
        self._lock."""
        if self._running.get(job.jid) is not job:
            return
        end = self.backend.check(job)
        if end == "started":        # e.g. a SLURM job left the queue and runs
            self._timeout_timer(job)
            self._persist(job)
        elif end == "changed":
            self._persist(job)
        elif end is not None:
            self._outcome(job, end)

    def _settle(self, jobs):
        """Let the backend record what it could not while the lock was held
        (the identity of a new process).  Journaled without waiting: until
        it is on disk, _is_alive recognizes the job by its command line."""
        for job in jobs:
            ident = self.backend.settle(job)
            if ident is not None:
                with self._lock:
                    if self._running.get(job.jid) is job and job.ident is None:
                        job.ident = ident
                        self._persist(job)      # durable at the next flush
                        if self._flush_due is None:
                            self._flush_due = _time() + FLUSH_DELAY
                            self._wake()

    def _collect_safely(self, job):
        """_collect, but a failure settles that one job instead of leaving a
        readable pidfd to spin the reaper.  Caller holds self._lock."""
        try:
            self._collect(job)
        except Exception as e:
            log.exception("collecting job %s failed", job.jid)
            self._finish(job, UNDEFINED, None, "pman could not collect the exit "
                         "status: %s" % e)

    def _recover(self):
        """Re-adopt or settle the jobs a previous manager left active.
        Caller holds self._lock."""
        for job in [e for e in self._jobs.values() if not isinstance(e, str)]:
            try:
                if job.status == NOTSTARTED and job.backend_id is None:
                    state = self.backend.recover_queued(job)
                else:
                    state = self.backend.recover(job)
            except PmanError as e:
                log.warning("cannot recover job %s now (%s): it stays as it was", job.jid, e)
                state = True
            if state is False:          # never reached the backend
                job.backend_id = None
                self._queue.append(job)
            elif state is True:
                self._running[job.jid] = job
                self.backend.watch(job)
                self._watch(job)
                self._collect(job)      # it may have ended while we set up the watch
                log.info("re-adopted job %s (%s)", job.jid, job.pid or job.backend_id)
            else:
                self._outcome(job, state)
        self._start_queued()

    def _start_queued(self):
        """Start queued jobs while slots are free; return how many started.
        The caller must sync the journal afterwards (outside the lock), so
        a crash cannot run them twice.  Caller holds self._lock."""
        started = []
        while self._queue and (self.max_running is None
                               or len(self._running) < self.max_running):
            job = self._queue.popleft()
            self._spawn(job)
            started.append(job)
        return started

    # -- the reaper thread ------------------------------------------------------

    def _reap_loop(self):
        while True:
            with self._lock:
                delay = self._timers[0][0] - _time() if self._timers else None
                if self._flush_due is not None:
                    flush = self._flush_due - _time()
                    delay = flush if delay is None else min(delay, flush)
                if self._closing:
                    return
            try:
                jobs = self.backend.wait(MAX_SLEEP if delay is None
                                         else min(MAX_SLEEP, max(0.0, delay)))
                self._reap_once(jobs)
            except Exception:     # the reaper must outlive any one job's trouble
                log.exception("pman reaper error (it keeps running)")

    def _reap_once(self, jobs):
        callbacks = []
        with self._lock:
            for job in jobs:
                self._collect_safely(job)
            now = _time()
            while self._timers and self._timers[0][0] <= now:
                _, _, kind, jid, seq = heapq.heappop(self._timers)
                job = self._running.get(jid)
                if job is not None and job.seq == seq:
                    try:
                        self._fire(job, kind)
                    except Exception:   # e.g. scancel or the disk failed: try again
                        log.exception("%s timer of job %s failed; retrying in %g s",
                                      kind, jid, TIMER_RETRY)
                        self._timer(TIMER_RETRY, kind, job)
            started = self._start_queued()
            doomed = 0
            if self.keep_finished is not None:
                doomed = self._finished - self.keep_finished
            flush = self._flush_due is not None and self._flush_due <= now
            if flush:
                self._flush_due = None
                idle = not self._running
            if self.on_end is not None:
                callbacks = [self._public(_record(self._jobs[jid]))
                             for jid in self._ended if jid in self._jobs]
            self._ended = []
        if started:
            self._store.sync()
            self._settle(started)
        if doomed > 0:
            self._forget(oldest=doomed)
        if flush:
            self._store.sync()
            if idle:
                with self._lock:
                    if not self._running:
                        self.backend.idle()
            self._maybe_compact()
        for record in callbacks:
            try:
                self.on_end(record)
            except Exception:
                log.exception("on_end callback failed for job %s", record["jid"])

    def _fire(self, job, kind):
        """Caller holds self._lock."""
        if kind == "timeout":
            self._signal(job, signal.SIGTERM, "timed out after %g s" % job.timeout, self.grace)
        elif kind == "resend":
            if job.kill_signal and job.kill_signal != signal.SIGKILL:
                self.backend.signal(job, job.kill_signal)
        elif kind == "escalate":
            if job.escalate_at is not None and _time() >= job.escalate_at - 0.001:
                self._signal(job, signal.SIGKILL, job.kill_reason, 0)
                job.escalate_at = None      # only once the SIGKILL went out
        elif kind == "logcheck":
            for stream in ("stdout", "stderr"):
                try:
                    size = os.stat(self._log_path(job.jid, stream)).st_size
                except OSError:
                    continue
                if size > self.log_limit and not job.kill_signal:
                    self._signal(job, signal.SIGTERM, "%s exceeded the log limit of %d bytes"
                                 % (stream, self.log_limit), self.grace)
            self._timer(LOG_CHECK_EVERY, "logcheck", job)

    # -- compaction -------------------------------------------------------------

    def _flush(self):
        self._store.sync()

    def _maybe_compact(self):
        if (self._store.journal_lines >= COMPACT_EVERY
                and self._compact_lock.acquire(blocking=False)):
            threading.Thread(target=self._compact_now, args=(False,),
                             name="pman-compact", daemon=True).start()

    def _compact_now(self, lock=True):
        """Write a snapshot of every job and start a fresh journal.  Appends
        go on meanwhile: they land in the new journal.  With lock=False the
        caller already holds self._compact_lock."""
        if lock:
            self._compact_lock.acquire()
        try:
            with self._lock:
                gen = self._store.rotate()
                lines = [e if isinstance(e, str) else e.line() for e in self._jobs.values()]
                next_seq = self._next_seq
            self._store.write_snapshot(lines, gen, next_seq)
        finally:
            self._compact_lock.release()


def _time_since(stamp):
    return datetime.now(timezone.utc).timestamp() - _parse_time(stamp) if stamp else 0.0


def _drain(fd):
    try:
        while os.read(fd, 65536):
            pass
    except BlockingIOError:
        pass


@atexit.register
def _close_all():
    """At exit, flush every open manager; running jobs keep running."""
    with _registry_lock:
        managers = list(_registry.values())
    for manager in managers:
        try:
            with _registry_lock:
                manager._refs = 1
            manager.close()
        except Exception:
            log.exception("closing %r at exit", manager)


# ---------------------------------------------------------------------------
# HTTP layer
# ---------------------------------------------------------------------------
# Thin by design: every route parses and validates the request, calls one
# JobManager method and serializes the result.  Job logic lives above.

MAX_BODY = 1 << 20          # bytes in a request body
MAX_HEAD = 1 << 16          # bytes of a request line and its headers
MAX_WAIT = 60.0             # cap of a long poll, in seconds
REQUEST_TIMEOUT = 10.0      # s for a whole request (head and body) to arrive; also
                            # the longest a kept-alive connection may sit idle
KEEPALIVE_LINGER = 0.05     # s a handler thread waits for a connection's next request
                            # before handing the connection back to the reader
DEFAULT_LISTENERS = 64
DEFAULT_LONG_POLLS = 256    # ?wait requests waiting at once; past it, 503
FD_RESERVE = 64             # fds never used for connections (state files, a spawn's)
PAGE_SIZE, MAX_PAGE = 100, 1000
BODY_TTL, BODY_CACHE_SIZE = 1.0, 4096   # finished jobs' encoded objects


class _Encoded:
    """A reply body already encoded as JSON bytes."""

    __slots__ = ("data",)

    def __init__(self, data):
        self.data = data


class HTTPError(PmanError):
    """A request the HTTP layer refuses.  Attribute: ``status``."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


# Library errors -> HTTP status codes, in one place.
_HTTP_STATUS = ((HTTPError, None), (JobNotFound, 404), (JobConflict, 409),
                (InvalidArgument, 400), (Timeout, 408), (StateCorrupt, 503),
                (BackendUnavailable, 503), (SubmitRejected, 400),
                (PmanError, 400))


def _status_for(exc):
    for cls, status in _HTTP_STATUS:
        if isinstance(exc, cls):
            return exc.status if status is None else status
    return 500


_date_cache = [0, ""]


def _http_date():
    """The Date header's value, formatted once a second."""
    now = int(_wall())
    if _date_cache[0] != now:
        _date_cache[:] = [now, email.utils.formatdate(now, usegmt=True)]
    return _date_cache[1]


def _is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _job_object(record):
    """The resource dialect's job object: pfcon's recorded fields at the
    top level, and the limits pman does not enforce named as such."""
    extras = record.pop("extras") or {}
    record.update(extras)
    record["not_enforced"] = sorted(k for k in ("cpu_limit", "memory_limit", "gpu_limit",
                                                "number_of_workers") if k in extras)
    return record


def _tree_info(record, manager):
    """INFO, the original runner's fields, computed from the record."""
    jid = record["jid"]
    started = record["started"] is not None
    done = record["status"] not in ACTIVE
    return {"cmd": record["cmd"], "jid": jid, "auid": record["auid"],
            "pid": record["pid"], "started": started, "startTrigger": started,
            "done": done, "doneTrigger": done, "returncode": record["returncode"],
            "startstamp": record["started"] or "", "endstamp": record["ended"] or "",
            "status": record["status"], "message": record["message"],
            "stdout": manager.tail(jid, "stdout"), "stderr": manager.tail(jid, "stderr")}


def job_tree(record, manager):
    """The original pman's view of one job, projected from its record on
    demand (never stored): see API.md, "The job tree"."""
    info = _tree_info(record, manager)
    start = {"0": info} if record["status"] != NOTSTARTED else {}
    end = {"0": info} if record["status"] not in ACTIVE else {}
    return {"jid": record["jid"], "cmd": record["cmd"], "auid": record["auid"],
            "d_meta": json.dumps(record["meta"]), "jobCount": 1,
            "startInfo": start, "endInfo": end,
            "start": {"0": {"startInfo": start}} if start else {},
            "end": {"0": {"endInfo": end}} if end else {}}


def _walk(tree, parts, path):
    node = tree
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            raise HTTPError(404, "no such path: %s" % path)
        node = node[part]
    return node


def _wrap(parts, value):
    for part in reversed(parts):
        value = {part: value}
    return value


def _get_str(obj, key, default=None, required=False):
    value = obj.get(key, default)
    if value is None and required:
        raise InvalidArgument("%r is required" % key)
    if value is not None and not isinstance(value, str):
        raise InvalidArgument("%r must be a string" % key)
    return value


class _CommandDialect:
    """``POST /api/v1/cmd``: the original pman's actions.  Each handler
    takes (meta, payload) and returns (ok, d_ret) or (ok, d_ret, extra
    envelope fields); `dispatch` looks them up in a fixed table."""

    def __init__(self, server):
        self.server = server
        self.handlers = {name: getattr(self, name) for name in self.ACTIONS}

    @staticmethod
    def _hits(manager, meta):
        key = _get_str(meta, "key", "jid")
        value = meta.get("value", meta.get("jid"))
        if value is None:
            raise InvalidArgument("'value' (or 'jid') is required")
        return manager.find(key, value)

    @staticmethod
    def _no_hit(with_status=False):
        d_ret = {"-1": {"noJobFound": {"endInfo": {"allJobsDone": None}}}}
        if with_status:
            d_ret["l_status"] = []
        return False, d_ret

    def run(self, meta, payload):
        manager = self.server.manager
        exec_ = payload.get("exec") if isinstance(payload.get("exec"), dict) else {}
        cmd = meta.get("cmd", exec_.get("cmd"))
        if not isinstance(cmd, str):
            raise InvalidArgument("run needs meta.cmd (or exec.cmd), a string")
        stored = {k: v for k, v in meta.items() if k not in ("cmd", "jid", "auid", "threaded")}
        record = manager.run(cmd, jid=meta.get("jid"), auid=_get_str(meta, "auid", ""),
                             meta=stored)
        return True, _job_object(record), {"jobRootDir": record["jid"]}

    def status(self, meta, payload, with_status=True):
        manager = self.server.manager
        hits = self._hits(manager, meta)
        if not hits:
            return self._no_hit(with_status)
        d_ret = {}
        for i, rec in enumerate(hits):
            if rec["status"] == NOTSTARTED:
                trigger = []
            else:
                trigger = [rec["started"] is not None]
            ended = rec["status"] not in ACTIVE
            d_ret["%d.start" % i] = {"jobRoot": rec["jid"], "startTrigger": trigger}
            d_ret["%d.end" % i] = {"jobRoot": rec["jid"],
                                   "returncode": [rec["returncode"]] if ended else []}
        if with_status:
            d_ret["l_status"] = [rec["status"] for rec in hits]
        return True, d_ret

    def done(self, meta, payload):
        return self.status(meta, payload, with_status=False)

    def info(self, meta, payload):
        manager = self.server.manager
        hits = self._hits(manager, meta)
        if not hits:
            return self._no_hit()
        d_ret = {}
        for i, rec in enumerate(hits):
            tree = job_tree(rec, manager)
            d_ret["%d.0" % i] = {rec["jid"]: {"startInfo": tree["startInfo"]}}
            d_ret["%d.1" % i] = {rec["jid"]: {"endInfo": tree["endInfo"]}}
        return True, d_ret

    def search(self, meta, payload):
        manager = self.server.manager
        hits = self._hits(manager, meta)
        if not hits:
            return self._no_hit()
        path = _get_str(meta, "path")
        if path is None and any(k in meta for k in ("job", "when", "field")):
            job = str(meta.get("job", "0"))
            when = _get_str(meta, "when", "end")
            if when not in ("start", "end"):
                raise InvalidArgument("'when' must be 'start' or 'end'")
            parts = [when, job, when + "Info", job]
            field = _get_str(meta, "field")
            if field:
                parts.append(field)
        else:
            parts = [p for p in (path or "").split("/") if p]
        d_ret = {}
        for i, rec in enumerate(hits):
            tree = job_tree(rec, manager)
            try:
                d_ret[str(i)] = {rec["jid"]: _walk(tree, parts, "/".join(parts))}
            except HTTPError:
                continue
        if not d_ret:
            return self._no_hit()
        return True, d_ret

    def get(self, meta, payload):
        manager = self.server.manager
        path = _get_str(meta, "path", required=True)
        parts = [p for p in path.split("/") if p]
        if not parts:
            raise InvalidArgument("'path' must name a job, e.g. /<jid>/endInfo")
        record = _record_by_name(manager, parts[0])
        value = _walk(job_tree(record, manager), parts[1:], path)
        return True, _wrap([record["jid"]] + parts[1:], value)

    def hello(self, meta, payload):
        ask = meta.get("askAbout", "timestamp")
        asks = ask if isinstance(ask, list) else [ask]
        d_ret = {}
        for item in asks:
            if item == "timestamp":
                d_ret["timestamp"] = {"now": datetime.now().strftime("%Y%m%d%H%M%S.%f")}
            elif item == "sysinfo":
                d_ret["sysinfo"] = {
                    "system": platform.system(), "machine": platform.machine(),
                    "platform": platform.platform(), "version": platform.version(),
                    "release": platform.release(), "cpucount": os.cpu_count(),
                    "loadavg": list(os.getloadavg()), "hostname": socket.gethostname(),
                    "python": platform.python_version(), "pman": __version__}
            elif item == "echoBack":
                text = meta.get("echoBack", "")
                if not isinstance(text, str):
                    raise InvalidArgument("'echoBack' must be a string")
                d_ret["echoBack"] = {"msg": text}
            else:
                raise InvalidArgument("askAbout must be timestamp, sysinfo or echoBack, not %r"
                                      % (item,))
        return True, d_ret

    @staticmethod
    def _jid(meta):
        jid = meta.get("jid", meta.get("value"))
        if not isinstance(jid, str):
            raise InvalidArgument("'jid' (or 'value') is required, a string")
        return check_jid(jid)

    def kill(self, meta, payload):
        manager = self.server.manager
        jid = self._jid(meta)
        record = manager.kill(jid, meta.get("signal", "SIGTERM"),
                              grace=_number_or_none(meta.get("grace"), "grace"))
        return True, _job_object(record)

    def delete(self, meta, payload):
        manager = self.server.manager
        jid = self._jid(meta)
        manager.remove(jid, kill=True)
        return True, {"action": "Delete Job", "job_id": jid,
                      "status": "Job deleted successfully"}

    def DBctl(self, meta, payload):
        manager = self.server.manager
        do = meta.get("do")
        if do == "save":
            manager.flush()
            return True, {"saved": manager.counts()}
        if do == "load":
            return True, {"loaded": manager.reload()}
        if do == "clear":
            return True, {"cleared": manager.forget()}
        raise InvalidArgument("DBctl needs do: save, load or clear, not %r" % (do,))

    def quit(self, meta, payload):
        manager = self.server.manager
        manager.flush()
        self.server.stop_soon()
        return True, {}

    ACTIONS = ("run", "status", "done", "info", "search", "get", "hello", "kill",
               "delete", "DBctl", "quit")

    def dispatch(self, body):
        payload = body.get("payload", body)
        if not isinstance(payload, dict):
            raise InvalidArgument("'payload' must be a JSON object")
        action = payload.get("action")
        meta = payload.get("meta", {})
        if not isinstance(meta, dict):
            raise InvalidArgument("'meta' must be a JSON object")
        if action not in self.ACTIONS:
            raise InvalidArgument("unknown action %r: one of %s" % (action, ", ".join(self.ACTIONS)))
        result = self.handlers[action](meta, payload)
        ok, d_ret = result[0], result[1]
        envelope = {"status": ok, "action": action, "meta": meta, "path": "/api/v1/cmd",
                    "RESTverb": "POST", "d_ret": d_ret}
        if len(result) > 2:
            envelope.update(result[2])
        return envelope


def _number_or_none(value, name):
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise InvalidArgument("%s must be a number, not %r" % (name, value)) from None
    return _check_number(name, value)


def _record_by_name(manager, name):
    """A job by jid, or by ``_N`` (0-based submission index)."""
    if re.fullmatch(r"_[0-9]{1,18}", name):
        return manager.nth(int(name[1:]))
    return manager.get(check_jid(name))


_RESOURCE_FIELDS = {"jid", "cmd", "entrypoint", "args", "auid", "env", "cwd", "timeout",
                    "meta"} | set(PFCON_FIELDS)


class _Routes:
    """The route table: (method, regex, OpenAPI path, handler name, summary).
    Handlers take (request, match, query, body) and return (status, obj)."""

    TABLE = [
        ("GET", r"/api/v1", "/api/v1/", "root", "List every jid (command dialect)"),
        ("POST", r"/api/v1", "/api/v1/", "create", "Run a job (resource dialect); 201"),
        ("GET", r"/api/v1/jobs", "/api/v1/jobs", "list_jobs",
         "Paged job list: ?status=&auid=&meta.KEY=&limit=&after="),
        ("GET", r"/api/v1/openapi\.json", "/api/v1/openapi.json", "openapi",
         "This OpenAPI document"),
        ("POST", r"/api/v1/cmd", "/api/v1/cmd/", "command",
         "The original command dialect: payload.action"),
        ("GET", r"/api/v1/(?P<jid>[^/]+)/logs", "/api/v1/{jid}/logs", "logs",
         "Read a log stream: ?stream=stdout|stderr&offset=N&limit=M"),
        ("POST", r"/api/v1/(?P<jid>[^/]+)/kill", "/api/v1/{jid}/kill", "kill",
         "Signal a job, SIGKILL after grace; 202"),
        ("GET", r"/api/v1/(?P<jid>[^/]+)", "/api/v1/{jid}/", "get_job",
         "A job object; ?wait=S long-polls until it ends"),
        ("DELETE", r"/api/v1/(?P<jid>[^/]+)", "/api/v1/{jid}/", "delete_job",
         "Kill if running, forget, remove logs; 204"),
        ("GET", r"/api/v1/(?P<jid>[^/]+)/(?P<tree>.+)", "/api/v1/{jid}/{path}", "walk",
         "A value of the job tree (jid or _N), wrapped in its path"),
    ]
    COMPILED = [(m, re.compile(rx + "/?"), p, h, s) for m, rx, p, h, s in TABLE]

    @classmethod
    def openapi(cls):
        paths = {}
        for method, _, path, handler, summary in cls.TABLE:
            op = {"summary": summary, "operationId": handler,
                  "responses": {"default": {"description": "JSON object; errors are "
                                            "{\"status\": false, \"message\": ...}"}}}
            params = re.findall(r"\{(\w+)\}", path)
            if params:
                op["parameters"] = [{"name": p, "in": "path", "required": True,
                                     "schema": {"type": "string"}} for p in params]
            if method == "POST":
                op["requestBody"] = {"required": True, "content": {
                    "application/json": {"schema": {"type": "object"}}}}
            paths.setdefault(path, {})[method.lower()] = op
        return {"openapi": "3.0.3",
                "info": {"title": "pman", "version": __version__,
                         "description": "Process manager API: command and resource dialects"},
                "paths": paths}


class _Handler(http.server.BaseHTTPRequestHandler):
    """The requests of one connection, given to `serve` one head at a time
    by _Server.  Persistent (HTTP/1.1), TCP_NODELAY, each reply sent in one
    write so a keep-alive client never waits on a delayed ACK."""

    protocol_version = "HTTP/1.1"
    server_version = "pman/" + __version__

    def __init__(self, conn, server):
        # Not BaseRequestHandler.__init__, which would serve the connection
        # to its end: `serve` takes one request head at a time (_Server).
        self.conn = conn
        self.request = self.connection = conn.sock
        self.client_address = conn.addr
        self.server = server
        self.wfile = _Writer(conn.sock)
        self._listener = False

    def serve(self, head, deadline):
        """Answer the request whose head (request line and headers) is
        *head*; its body, if any, must arrive by *deadline*."""
        self.rfile = io.BytesIO(head)
        self.deadline = deadline
        self.handle_one_request()

    # -- replies -------------------------------------------------------------

    def _reply(self, status, obj=None):
        if isinstance(obj, _Encoded):
            body = obj.data
        else:
            try:
                body = b"" if obj is None else json.dumps(obj, allow_nan=False).encode("utf-8")
            except ValueError:      # NaN or Infinity: never sent (inputs refuse them)
                log.error("a reply to %s held a non-JSON number", self.path.split("?")[0])
                status, body = 500, b'{"status": false, "message": "internal error: ValueError"}'
        reason = http.HTTPStatus(status).phrase if status in http.HTTPStatus._value2member_map_ else ""
        head = ["HTTP/1.1 %d %s" % (status, reason),
                "Server: " + self.server_version,
                "Date: " + _http_date()]
        if status != 204:
            head += ["Content-Type: application/json", "Content-Length: %d" % len(body)]
        if self.close_connection:
            head.append("Connection: close")
        self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        self.log_request(status, len(body))

    def send_error(self, code, message=None, explain=None):
        # http.server calls this for malformed requests: always the client's
        # fault, so never a 5xx, and always JSON.
        code = {501: 405, 505: 400}.get(code, code)
        if code >= 500:
            code = 400
        self.close_connection = True
        self._reply(code, {"status": False, "message": message or
                           http.HTTPStatus(code).phrase})

    def log_request(self, code="-", size="-"):
        if log.isEnabledFor(logging.INFO):      # the hot path formats nothing
            super().log_request(code, size)

    def log_message(self, format, *args):
        log.info("%s %s", self.address_string(), format % args)

    # -- dispatch ------------------------------------------------------------

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def do_HEAD(self):
        self.close_connection = True
        self._dispatch("HEAD")

    def do_OPTIONS(self):
        self._dispatch("OPTIONS")

    def _dispatch(self, method):
        self._body_done = False
        try:
            status, obj = self._route(method)
        except Exception as e:
            if not self._body_done and (self.headers.get("Transfer-Encoding") or
                                        self.headers.get("Content-Length", "0") != "0"):
                self.close_connection = True    # an unread body would garble the next request
            status = _status_for(e)
            if status == 500:
                log.exception("internal error on %s %s", method, self.path.split("?")[0])
                message = "internal error: %s" % type(e).__name__
            else:
                message = str(e)
            obj = {"status": False, "message": message}
            if getattr(e, "envelope", None):
                obj = dict(e.envelope, **obj)
        finally:
            if self._listener:
                self._listener = False
                self.server.listeners.release()
        try:
            self._reply(status, obj)
        except OSError:
            self.close_connection = True

    def release_listener(self):
        """A long poll holds no listener while it waits."""
        if self._listener:
            self._listener = False
            self.server.listeners.release()

    def _check_access(self):
        server = self.server
        if server.loopback:
            host = self.headers.get("Host")
            if host is not None:
                name = host.strip().lower()
                port = ""
                if name.startswith("["):            # [::1]:5010
                    name, _, port = name[1:].partition("]")
                    port = port[1:]
                elif name.count(":") == 1:          # localhost:5010
                    name, port = name.split(":")
                if port and not port.isdigit():
                    name = host
                if name not in server.allowed_hosts:
                    raise HTTPError(403, "forbidden Host header %r: this server answers "
                                    "only to its loopback names" % host)
        if server.token is not None:
            given = self.headers.get("Authorization", "")
            scheme, _, token = given.partition(" ")
            ok = scheme.lower() == "bearer" and hmac.compare_digest(
                token.strip().encode("latin-1", "replace"), server.token)
            if not ok:
                raise HTTPError(401, "missing or wrong bearer token")

    def _read_body(self, method):
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise HTTPError(411, "chunked or encoded bodies are not supported: "
                            "send Content-Length")
        lengths = self.headers.get_all("Content-Length") or []
        if len(lengths) > 1:
            self.close_connection = True
            raise HTTPError(400, "more than one Content-Length header")
        if not lengths:
            if method == "POST":
                self.close_connection = True
                raise HTTPError(411, "a POST needs a Content-Length header")
            self._body_done = True
            return None
        text = lengths[0].strip()
        if not text.isdigit() or not text.isascii():
            self.close_connection = True
            raise HTTPError(400, "invalid Content-Length %r" % lengths[0])
        length = int(text)
        if length > MAX_BODY:
            self.close_connection = True
            raise HTTPError(413, "body of %d bytes is over the limit of %d" % (length, MAX_BODY))
        try:
            data = self.conn.read(length, self.deadline) if length else b""
        except OSError:         # the request's deadline passed, or the client left
            self.close_connection = True
            raise HTTPError(408, "the request did not arrive within %g s"
                            % self.server.request_timeout) from None
        self._body_done = True
        if len(data) < length:
            self.close_connection = True
            raise HTTPError(400, "body shorter than its Content-Length")
        if method != "POST":
            return None
        try:
            body = _loads(data.decode("utf-8"))
        except (ValueError, RecursionError) as e:
            raise HTTPError(400, "invalid JSON body: %s" % (
                "nested too deeply" if isinstance(e, RecursionError) else e)) from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the body must be a JSON object")
        # The envelope around a job's meta takes a few levels more than meta.
        if not _depth_ok(body, MAX_DEPTH + 3):
            raise HTTPError(400, "invalid JSON body: nested too deeply (a job's meta may "
                            "nest %d levels)" % MAX_DEPTH)
        return body

    def _route(self, method):
        self._check_access()
        body = self._read_body(method)
        # Counted once the request is in: a slow client holds no listener.
        if not self.server.listeners.acquire(blocking=False):
            raise HTTPError(503, "too many requests in progress: try again")
        self._listener = True
        if not self.path.startswith("/"):
            raise HTTPError(400, "the request target must be a path")
        try:
            parts = urllib.parse.urlsplit(self.path)
        except ValueError:
            raise HTTPError(400, "malformed request target") from None
        path = parts.path
        try:
            query = urllib.parse.parse_qs(parts.query, keep_blank_values=True,
                                          strict_parsing=True, errors="strict") \
                if parts.query else {}
        except (ValueError, UnicodeDecodeError):
            raise HTTPError(400, "malformed query string") from None
        for key, values in query.items():
            if len(values) > 1:
                raise HTTPError(400, "query parameter %r given more than once" % key)
        query = {k: v[0] for k, v in query.items()}
        allowed = []
        for route_method, regex, _, handler, _ in _Routes.COMPILED:
            match = regex.fullmatch(path)
            if match is None:
                continue
            if route_method != method:
                allowed.append(route_method)
                continue
            groups = {}
            for key, value in match.groupdict().items():
                try:
                    groups[key] = urllib.parse.unquote(value, errors="strict")
                except UnicodeDecodeError:
                    raise HTTPError(400, "invalid percent-encoding in path") from None
            return getattr(self, "route_" + handler)(groups, query, body)
        if allowed:
            raise HTTPError(405, "%s is not allowed here; use %s" % (method, ", ".join(allowed)))
        raise HTTPError(404, "no such route: %s" % path[:200])

    @staticmethod
    def _only(query, *names):
        extra = set(query) - set(names)
        if extra:
            raise HTTPError(400, "unknown query parameter(s): %s" % ", ".join(sorted(extra)))

    @property
    def manager(self):
        return self.server.manager

    # -- routes --------------------------------------------------------------

    def route_root(self, groups, query, body):
        self._only(query)
        return 200, {"status": True, "path": "/api/v1",
                     "GET": {jid: {} for jid in self.manager.jids()},
                     "server_version": __version__,
                     "container_env": self.server.container_env}

    def route_create(self, groups, query, body):
        self._only(query)
        unknown = set(body) - _RESOURCE_FIELDS
        if unknown:
            raise InvalidArgument("unknown field(s): %s" % ", ".join(sorted(unknown)))
        cmd = body.get("cmd")
        if cmd is not None and "entrypoint" in body:
            raise InvalidArgument("give either 'cmd' or 'entrypoint' + 'args', not both")
        if cmd is None:
            entry, args = body.get("entrypoint"), body.get("args", [])
            for name, value in (("entrypoint", entry), ("args", args)):
                if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
                    raise InvalidArgument("%r must be a list of strings (or give 'cmd')" % name)
            cmd = entry + args
        elif not isinstance(cmd, str):
            raise InvalidArgument("'cmd' must be a string")
        extras = {k: body[k] for k in PFCON_FIELDS if k in body}
        record = self.manager.run(
            cmd, jid=body.get("jid"), auid=_get_str(body, "auid", ""), meta=body.get("meta"),
            env=body.get("env"), cwd=body.get("cwd"),
            timeout=_number_or_none(body.get("timeout"), "timeout"), extras=extras)
        return 201, _job_object(record)

    def route_list_jobs(self, groups, query, body):
        meta = {k[5:]: v for k, v in query.items() if k.startswith("meta.")}
        self._only({k: v for k, v in query.items() if not k.startswith("meta.")},
                   "status", "auid", "limit", "after")
        limit = query.get("limit", str(PAGE_SIZE))
        if not re.fullmatch(r"[0-9]{1,6}", limit) or not 0 < int(limit) <= MAX_PAGE:
            raise HTTPError(400, "limit must be an integer from 1 to %d" % MAX_PAGE)
        limit = int(limit)
        status = query["status"].split(",") if query.get("status") else None
        after = query.get("after") or None
        if after is not None:
            check_jid(after)
        found = self.manager.jobs(status=status, auid=query.get("auid"), meta=meta or None,
                                  limit=limit + 1, after=after)
        more = len(found) > limit
        found = found[:limit]
        return 200, {"jobs": [_job_object(r) for r in found],
                     "next": found[-1]["jid"] if more else None}

    def route_openapi(self, groups, query, body):
        self._only(query)
        return 200, _Routes.openapi()

    def route_command(self, groups, query, body):
        self._only(query)
        try:
            return 200, self.server.commands.dispatch(body)
        except PmanError as e:
            payload = body.get("payload", body) if isinstance(body.get("payload", body), dict) else {}
            e.envelope = {"action": payload.get("action"), "meta": payload.get("meta"),
                          "path": "/api/v1/cmd", "RESTverb": "POST"}
            raise

    def route_logs(self, groups, query, body):
        self._only(query, "stream", "offset", "limit")
        ints = {}
        for name in ("offset", "limit"):
            if name in query:
                if not re.fullmatch(r"[0-9]{1,18}", query[name]):
                    raise HTTPError(400, "%s must be a non-negative integer" % name)
                ints[name] = int(query[name])
        chunk = self.manager.read_log(check_jid(groups["jid"]), query.get("stream", "stdout"),
                                      offset=ints.get("offset", 0), limit=ints.get("limit"))
        chunk["data"] = str(chunk["data"], "utf-8", "replace")
        return 200, chunk

    def route_kill(self, groups, query, body):
        self._only(query)
        unknown = set(body) - {"signal", "grace"}
        if unknown:
            raise InvalidArgument("unknown field(s): %s" % ", ".join(sorted(unknown)))
        record = self.manager.kill(check_jid(groups["jid"]), body.get("signal", "SIGTERM"),
                                   grace=_number_or_none(body.get("grace"), "grace"))
        return 202, _job_object(record)

    def route_get_job(self, groups, query, body):
        self._only(query, "wait")
        name = groups["jid"]
        if name.startswith("_"):
            return self.route_walk({"jid": name, "tree": ""}, query, body)
        jid = check_jid(name)
        if "wait" in query:
            try:
                wait = float(query["wait"])
            except ValueError:
                raise HTTPError(400, "wait must be a number of seconds") from None
            if not 0 <= wait < math.inf:        # NaN and Infinity too
                raise HTTPError(400, "wait must be a number of seconds")
            wait = min(wait, self.server.max_wait)
            self.release_listener()
            if not self.server.long_polls.acquire(blocking=False):
                raise HTTPError(503, "too many long polls in progress: try again")
            try:
                self.manager.wait(jid, timeout=wait)
            except Timeout:
                pass
            finally:
                self.server.long_polls.release()
        # A finished job's object only changes if its logs do: serve it from
        # the cache for BODY_TTL seconds (a job's stray background process
        # may still write).  Queued and running jobs are never cached.
        cache = self.server.body_cache
        tag = self.manager.etag(jid)
        hit = cache.get(jid)
        now = _time()
        if tag is not None and hit is not None and hit[0] == tag and hit[1] > now:
            return 200, hit[2]
        body = _Encoded(json.dumps(_job_object(self.manager.get(jid, with_logs=True)),
                                   allow_nan=False).encode("utf-8"))
        if tag is not None:
            if len(cache) >= BODY_CACHE_SIZE:
                cache.clear()
            cache[jid] = (tag, now + BODY_TTL, body)
        return 200, body

    def route_delete_job(self, groups, query, body):
        self._only(query)
        self.manager.remove(check_jid(groups["jid"]), kill=True)
        return 204, None

    def route_walk(self, groups, query, body):
        self._only(query)
        record = _record_by_name(self.manager, groups["jid"])
        parts = [p for p in groups["tree"].split("/") if p]
        value = _walk(job_tree(record, self.manager), parts, "/".join(parts))
        path = "/api/v1/" + "/".join([groups["jid"]] + parts)
        return 200, {"status": True, "path": path,
                     "GET": _wrap([record["jid"]] + parts, value)}


class _Writer:
    """The handler's wfile: each reply is one sendall."""

    __slots__ = ("sock",)

    def __init__(self, sock):
        self.sock = sock

    def write(self, data):
        self.sock.sendall(data)     # a client that does not read: request_timeout
        return len(data)

    def flush(self):
        pass


class _Conn:
    """One client connection: its socket and the bytes received but not yet
    used.  While no request is complete it is *parked*: the reader thread
    alone reads it, and no thread is spent on it.  Once a request head is
    in, one handler thread owns it until it goes idle again."""

    __slots__ = ("sock", "addr", "buf", "since", "idle_since", "handler", "poller", "timeout")

    def __init__(self, sock, addr):
        self.sock, self.addr = sock, addr
        self.buf = bytearray()
        self.since = None           # when the first byte of the pending request came
        self.idle_since = _time()
        self.handler = None
        self.poller = None          # a handler thread's wait for the next request
        self.timeout = None         # the socket's timeout while a handler owns it

    def head_end(self):
        """The length of a complete request head at the start of buf, or -1.
        The head ends at its first empty line, CRLF or bare LF."""
        buf = self.buf
        crlf = buf.find(b"\n\r\n")
        lf = buf.find(b"\n\n", 0, crlf + 2 if crlf >= 0 else len(buf))
        if lf >= 0:
            return lf + 2
        return crlf + 3 if crlf >= 0 else -1

    def take(self, n):
        """The first *n* bytes of buf, removed from it."""
        buf = self.buf
        if n == len(buf):       # the usual case: nothing pipelined behind
            data = bytes(buf)
            buf.clear()
            self.since = None
        else:
            data = bytes(buf[:n])
            del buf[:n]
            self.since = _time()
        return data

    def read(self, n, deadline):
        """*n* bytes (fewer if the client closes), by *deadline* (monotonic);
        raises socket.timeout past it, however slowly the bytes trickle."""
        if len(self.buf) < n:
            try:
                while len(self.buf) < n:
                    left = deadline - _time()
                    if left <= 0:
                        raise socket.timeout("request deadline passed")
                    self.sock.settimeout(left)
                    data = self.sock.recv(min(MAX_BODY, max(65536, n - len(self.buf))))
                    if not data:
                        break
                    self.buf += data
            finally:
                self.sock.settimeout(self.timeout)
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def next_head(self, linger):
        """Wait up to *linger* s for the whole head of the next request:
        its length, -1 if it is not complete by then, 0 if the client
        closed.  A busy keep-alive client is served by the same thread.
        The socket's timeout stays as it is (no syscall per request)."""
        if self.buf:
            end = self.head_end()
            if end >= 0:
                return end
        poller = self.poller
        if poller is None:
            poller = self.poller = select.poll()
            poller.register(self.sock, select.POLLIN)
        wait, until = linger * 1000, None
        while len(self.buf) <= MAX_HEAD and poller.poll(wait):
            data = self.sock.recv(65536)
            if not data:
                return 0
            if self.since is None:
                self.since = _time()
            self.buf += data
            end = self.head_end()
            if end >= 0:
                return end
            if until is None:           # a head in pieces: the rest within linger
                until = _time() + linger
            wait = (until - _time()) * 1000
            if wait <= 0:
                break
        return -1

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.sock.close()


def _canned(status, reason, message):
    body = json.dumps({"status": False, "message": message}).encode("utf-8")
    return (b"HTTP/1.1 %d %s\r\nServer: pman/%s\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
            % (status, reason.encode(), __version__.encode(), len(body), body))


def _fd_limit(raise_soft=False):
    """The soft RLIMIT_NOFILE; with *raise_soft*, first raise it to the hard
    limit (no privilege needed)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if raise_soft and soft != hard:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.info("could not raise the fd limit from %d to %d: %s", soft, target, e)
    return soft


class _Server(http.server.HTTPServer):
    """One reader thread (the one in `serve_forever`) accepts connections
    and reads them with `selectors` until a request head is complete; only
    then a handler thread (``pman-http``) serves it, and keeps serving that
    connection while its requests follow each other, then hands it back.
    So slow or idle clients cost no thread.  Bounds: a whole request must
    arrive within ``request_timeout``, idle connections close after it, at
    most ``max_connections`` are open (past it a new one gets 503 at once),
    and `listeners` caps the requests processed at once."""

    request_queue_size = 1024   # socketserver's 5 drops SYNs under a burst
    allow_reuse_address = True

    def server_activate(self):
        super().server_activate()
        self._parked = {}                   # fd -> _Conn; the reader thread only
        self._returned = collections.deque()    # _Conns handed back by handler threads
        self._waker = _Waker()
        self._open = 0                      # connections open
        self._open_lock = threading.Lock()  # guards _open
        self._stop = threading.Event()      # shutdown() asks the reader to stop
        self._stopped = threading.Event()   # the reader has stopped
        self._stopped.set()

    def serve_forever(self, poll_interval=None):
        """Accept and read connections until `shutdown` (*poll_interval* is
        accepted for socketserver's signature; shutdown wakes the loop)."""
        self._stop.clear()
        self._stopped.clear()
        sel = selectors.DefaultSelector()
        try:
            self.socket.setblocking(False)
            sel.register(self.socket, selectors.EVENT_READ, "accept")
            sel.register(self._waker.r, selectors.EVENT_READ, "wake")
            sweep_every = min(0.25, self.request_timeout / 4)
            next_sweep = _time() + sweep_every
            paused_until, backoff = None, 0.0
            while not self._stop.is_set():
                now = _time()
                wait = next_sweep - now
                if paused_until is not None:
                    wait = min(wait, paused_until - now)
                for key, _ in sel.select(max(0.0, wait)):
                    if key.data == "accept":
                        err = self._accept(sel)
                        if err is not None:     # out of fds: stop selecting the listener
                            sel.unregister(self.socket)
                            if not backoff:
                                log.warning("cannot accept connections (%s): pausing "
                                            "accepts, retrying with a backoff", err)
                            backoff = min(1.0, backoff * 2 or 0.05)
                            paused_until = _time() + backoff
                        elif backoff:
                            log.warning("accepting connections again")
                            backoff = 0.0
                    elif key.data == "wake":
                        _drain(self._waker.r)
                        while self._returned:
                            self._park(sel, self._returned.popleft())
                    else:
                        self._on_readable(sel, key.data)
                now = _time()
                if paused_until is not None and now >= paused_until:
                    paused_until = None
                    sel.register(self.socket, selectors.EVENT_READ, "accept")
                if now >= next_sweep:
                    next_sweep = now + sweep_every
                    self._sweep(sel, now)
        finally:
            for conn in list(self._parked.values()):
                self._drop(conn)
            self._parked.clear()
            sel.close()
            self._stopped.set()

    def shutdown(self):
        """Stop `serve_forever` and wait until it has returned."""
        self._stop.set()
        self._waker.wake()
        self._stopped.wait()

    def server_close(self):
        super().server_close()
        self._waker.close()

    # -- the reader thread ---------------------------------------------------

    def _accept(self, sel):
        """Accept what is pending; return an errno name if out of fds."""
        for _ in range(64):
            try:
                sock, addr = self.socket.accept()
            except BlockingIOError:
                return None
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return errno.errorcode.get(e.errno, str(e.errno))
                continue            # ECONNABORTED and the like: that client only
            with self._open_lock:
                full = self._open >= self.max_connections
                if not full:
                    self._open += 1
            if full:
                try:
                    sock.setblocking(False)
                    sock.send(self._full_reply)
                except OSError:
                    pass
                sock.close()
                continue
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            self._park(sel, _Conn(sock, addr))
        return None

    def _park(self, sel, conn):
        conn.sock.settimeout(0.0)
        conn.idle_since = _time()
        self._parked[conn.sock.fileno()] = conn
        sel.register(conn.sock, selectors.EVENT_READ, conn)

    def _unpark(self, sel, conn):
        del self._parked[conn.sock.fileno()]
        sel.unregister(conn.sock)

    def _on_readable(self, sel, conn):
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._unpark(sel, conn)
            self._drop(conn)
            return
        if conn.since is None:
            conn.since = _time()
        conn.buf += data
        end = conn.head_end()
        if end < 0 and len(conn.buf) <= MAX_HEAD:
            return
        self._unpark(sel, conn)
        if end < 0:
            self._drop(conn, _canned(431, "Request Header Fields Too Large",
                                     "the request line and headers exceed %d bytes" % MAX_HEAD))
            return
        threading.Thread(target=self._serve_conn, args=(conn, end), name="pman-http",
                         daemon=True).start()

    def _sweep(self, sel, now):
        """Close parked connections whose request is overdue, or that sat
        idle too long."""
        limit = self.request_timeout
        for conn in list(self._parked.values()):
            if conn.since is not None and now - conn.since > limit:
                self._unpark(sel, conn)
                self._drop(conn, _canned(408, "Request Timeout", "the request did not "
                                         "arrive within %g s" % limit))
            elif conn.since is None and now - conn.idle_since > limit:
                self._unpark(sel, conn)
                self._drop(conn)

    def _drop(self, conn, reply=None):
        if reply is not None:
            try:
                conn.sock.settimeout(0.0)
                conn.sock.send(reply)
            except OSError:
                pass
        try:
            conn.close()
        except OSError:
            pass
        with self._open_lock:
            self._open -= 1

    # -- handler threads -------------------------------------------------------

    def _serve_conn(self, conn, end):
        """Serve requests on *conn* while they come back to back; then hand
        it back to the reader (or close it)."""
        try:
            if conn.handler is None:
                conn.handler = _Handler(conn, self)
                conn.timeout = self.request_timeout
            conn.sock.settimeout(conn.timeout)     # blocking, bounded, until parked again
            handler = conn.handler
            while end > 0:
                since = conn.since
                handler.serve(conn.take(end), since + self.request_timeout)
                if handler.close_connection or self._stop.is_set():
                    break
                end = conn.next_head(self.linger)
                if end < 0:                 # idle, or a slow next request
                    self._returned.append(conn)
                    self._waker.wake()
                    return
        except Exception:
            log.debug("connection from %s failed", conn.addr, exc_info=True)
        self._drop(conn)

    def stop_soon(self):
        threading.Thread(target=self.shutdown, name="pman-http-stop", daemon=True).start()


def make_server(manager, host="127.0.0.1", port=5010, *, token=None,
                listeners=DEFAULT_LISTENERS, insecure_no_token=False,
                request_timeout=REQUEST_TIMEOUT, max_wait=MAX_WAIT,
                long_polls=DEFAULT_LONG_POLLS, max_connections=None):
    """An HTTP server for *manager*, bound but not yet serving: call its
    ``serve_forever()`` (in a thread if you like) and ``shutdown()``.

    A non-loopback *host* needs a *token* (clients send ``Authorization:
    Bearer <token>``) unless ``insecure_no_token=True``.  While bound to
    loopback, requests naming a foreign Host are refused (403).

    *request_timeout* (s) bounds the arrival of a whole request and the idle
    time of a kept-alive connection; *listeners* the requests processed at
    once; *long_polls* the ``?wait`` requests waiting at once; past either,
    503.  *max_connections* defaults to the soft ``RLIMIT_NOFILE`` less
    FD_RESERVE and one fd per job slot (``max_running``, or half the limit
    when it is unlimited): past it a new connection gets 503 at once."""
    if token is not None:
        if not isinstance(token, str) or not token or not token.isascii():
            raise InvalidArgument("the token must be a non-empty ASCII string")
    loopback = _is_loopback(host)
    if not loopback and token is None and not insecure_no_token:
        raise PmanError("refusing to serve on non-loopback address %s without a token: "
                        "give --token/--token-file (or PMAN_TOKEN), or --insecure-no-token "
                        "to serve anyway" % host)
    if isinstance(listeners, bool) or not isinstance(listeners, int) or listeners < 1:
        raise InvalidArgument("listeners must be a positive integer")
    for name, value in (("request_timeout", request_timeout), ("max_wait", max_wait)):
        if _check_number(name, value, allow_none=False) <= 0:
            raise InvalidArgument("%s must be positive" % name)
    for name, value in (("long_polls", long_polls), ("max_connections", max_connections)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise InvalidArgument("%s must be a positive integer" % name)
    if max_connections is None:
        fds = _fd_limit()
        max_connections = max(16, fds - FD_RESERVE - (manager.max_running or fds // 2))
    server_cls = _Server
    if ":" in host:
        server_cls = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
    server = server_cls((host.strip("[]"), port), _Handler)
    server.manager = manager
    server.token = None if token is None else token.encode("ascii")
    server.loopback = loopback
    server.allowed_hosts = {"localhost", "127.0.0.1", "::1", host.strip("[]").lower()}
    server.listeners = threading.BoundedSemaphore(listeners)
    server.request_timeout = request_timeout
    server.max_wait = max_wait
    server.linger = min(KEEPALIVE_LINGER, request_timeout)
    server.long_polls = threading.BoundedSemaphore(long_polls)
    server.max_connections = max_connections
    server._full_reply = _canned(503, "Service Unavailable", "too many open connections "
                                 "(%d): try again" % max_connections)
    server.container_env = manager.backend.name
    server.commands = _CommandDialect(server)
    server.body_cache = {}          # jid -> (etag, expiry, _Encoded)
    return server


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def _parser():
    import argparse
    p = argparse.ArgumentParser(
        prog="pman", description="Serve a pman job manager over HTTP (both the original "
        "command dialect and the resource dialect under /api/v1).")
    p.add_argument("--http", action="store_true",
                   help="serve HTTP (the default; accepted for old start scripts)")
    p.add_argument("--ip", "--host", dest="host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=5010, help="port (default 5010; 0 picks one)")
    p.add_argument("--state-dir", "--DBpath", dest="state_dir", default=None,
                   help="state directory (default $PMAN_STATE_DIR, $XDG_STATE_HOME/pman "
                   "or ~/.local/state/pman)")
    p.add_argument("--max-running", type=int, default=None,
                   help="run at most N jobs at once; queue the rest")
    p.add_argument("--grace", type=float, default=DEFAULT_GRACE,
                   help="seconds from a kill's signal to SIGKILL (default 5)")
    p.add_argument("--log-limit", type=int, default=None,
                   help="kill a job whose stdout or stderr passes N bytes")
    p.add_argument("--keep-finished", type=int, default=None,
                   help="forget the oldest finished jobs past N")
    p.add_argument("--backend", choices=("local", "slurm"), default="local",
                   help="where jobs run: this machine (default) or a SLURM cluster")
    p.add_argument("--slurm-partition", default=None,
                   help="with --backend slurm: the partition to submit to")
    p.add_argument("--sbatch-args", default="",
                   help="with --backend slurm: extra sbatch arguments, one shell-quoted "
                   "string, e.g. \"--qos=long --account=lab\" (a single option needs "
                   "the = form: --sbatch-args=--qos=long)")
    p.add_argument("--token", default=None, help="require 'Authorization: Bearer TOKEN' "
                   "(or set PMAN_TOKEN; prefer --token-file: argv is visible to other users)")
    p.add_argument("--token-file", default=None, help="read the token from this file")
    p.add_argument("--insecure-no-token", action="store_true",
                   help="allow a non-loopback address without a token")
    p.add_argument("--listeners", type=int, default=DEFAULT_LISTENERS,
                   help="requests processed at once; past it, 503 (default 64)")
    p.add_argument("--request-timeout", type=float, default=REQUEST_TIMEOUT, metavar="S",
                   help="seconds a client has to send a whole request, and the longest "
                   "a kept-alive connection may sit idle (default %g)" % REQUEST_TIMEOUT)
    p.add_argument("--max-connections", type=int, default=None, metavar="N",
                   help="open connections at most; past it, 503 at once (default: from "
                   "the fd limit, which pman raises to its hard limit at start)")
    p.add_argument("--kill-on-exit", action="store_true",
                   help="kill running jobs when the server stops (default: they keep "
                   "running and the next start re-adopts them)")
    p.add_argument("--raw", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rawmode", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="log more (-v: requests, -vv: debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="log only errors")
    p.add_argument("--log-file", default=None, help="log to this file instead of stderr")
    p.add_argument("--version", action="version", version="pman " + __version__)
    return p


def main(argv=None):
    """``pman [--http] [--port 5010] ...``: serve until SIGTERM/SIGINT or
    the ``quit`` action; state is flushed on the way out."""
    args = _parser().parse_args(argv)
    level = logging.ERROR if args.quiet else (
        logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, filename=args.log_file,
                        format="%(asctime)s pman %(levelname)s %(message)s")
    token = args.token or os.environ.get("PMAN_TOKEN") or None
    _fd_limit(raise_soft=True)      # connections and jobs' pidfds: see make_server
    try:
        if args.token_file:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        backend = (SlurmBackend(args.slurm_partition, args.sbatch_args)
                   if args.backend == "slurm" else "local")
        manager = JobManager(args.state_dir, max_running=args.max_running, grace=args.grace,
                             log_limit=args.log_limit, keep_finished=args.keep_finished,
                             backend=backend)
    except (PmanError, OSError) as e:
        print("pman: %s" % e, file=sys.stderr)
        return 2
    try:
        server = make_server(manager, args.host, args.port, token=token,
                             listeners=args.listeners,
                             insecure_no_token=args.insecure_no_token,
                             request_timeout=args.request_timeout,
                             max_connections=args.max_connections)
    except (PmanError, OSError) as e:
        manager.close()
        print("pman: %s" % e, file=sys.stderr)
        return 2

    def stop(signum, frame):
        log.warning("pman: %s received, stopping", signal_name(signum))
        server.stop_soon()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = server.server_address[:2]
    log.warning("pman %s serving http://%s:%d/api/v1/ (state: %s)",
                __version__, host if ":" not in host else "[%s]" % host, port, manager.state_dir)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        manager.close(kill=args.kill_on_exit)
    log.warning("pman stopped; state flushed to %s", manager.state_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
