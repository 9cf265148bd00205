"""pman: a process manager for shell jobs, in one standard-library module.

pman launches shell commands (or argv lists) as jobs and tracks them: their
status, exit code, output, kill and timeout, all of it surviving a restart of
the manager.  Jobs run as process groups on this machine, as batch jobs on
a SLURM cluster (``backend="slurm"``), or as containers of an image, the
way pman 3.x runs ChRIS plugins (``backend="podman"``).  It is a library
first::

    import pman
    job = pman.JobManager().run("cal 7 1970", jid="123")
    pman.JobManager().wait("123")["returncode"]          # -> 0

and an HTTP server second (``python pman.py serve --port 5010``), speaking
both dialects of the original pman's ``/api/v1`` API, with a change feed
(``/api/v1/events``), a live status page at ``/``, Prometheus metrics at
``/metrics``, and a command line that is its client (``python pman.py run
-- make``, ``ls``, ``logs -f``, ``wait``...).

Vendoring
---------
Copy this one file into your project.  It needs Python 3.9+ on Linux and
nothing outside the standard library.

Contents
--------
The sections, in dependency order (each has a banner of its own):

1. Constants and clocks; 2. Exceptions (`PmanError` and its children);
3. Validation (a job's arguments, checked before anything is written);
4. The job record (`_Job`, its JSON line); 5. Persistence (the snapshot and
the journal: `_Store`); 6. Processes (identity, exit codes and the wrapper
shell that records them); 7. The backend seam (`_Backend`) and the local
backend; 8. The SLURM backend; 9. The podman backend; 10. JobManager's
parts (retention, timers, log files, the change feed, metrics, filters);
11. The scheduler (`_Scheduler`: what may start now, and why each queued
job waits); 12. `JobManager` (its public API, then a job's life in order:
submission, start, timers and signals, end, recovery, then the reaper
thread); 13. HTTP limits, errors and job objects; 14. The command dialect;
15. The API routes (`_Api`, `_Routes`); 16. The HTTP server: requests
(`_Handler`) and 17. connections (`_Server`, `make_server`); 18-21. The
command line (the server, the client, its commands, its parser and
`main`); 22. The original pman's module entry point (`pman.pman`); 23. The
status page (HTML, CSS and JavaScript: data, not code).

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
``groups.json``
    the groups' limits and pauses (see `JobManager.set_group`), written
    atomically.
``podman/``
    the podman backend's working directory (see `PodmanBackend`).

Threading model
---------------
A `JobManager` owns one reaper thread (``pman-reaper``) whatever the number
of jobs: it waits on a pidfd per running job with epoll (polling the
few it could not open one for), collects exit statuses with
``waitpid(pid)`` (never ``waitpid(-1)``, which would steal the statuses of
the host application's own children), fires timeouts and kill escalations,
and starts queued jobs.  `JobManager` objects opened on the same directory
in one process share one manager.  When the program exits, running jobs keep
running and the next manager re-adopts them, unless the manager was closed
with ``kill=True``.

Locks, in the order they may be taken: the manager's ``_compact_lock`` (one
compaction at a time), its ``_lock`` (all job state), the backend's own
(LocalBackend: ``_reap_lock``, so that a pid is signalled only while it
cannot have been reaped and reused; PodmanBackend: ``_doomed_lock``, the
containers to remove), the store's ``_lock`` (its buffers).

Durability policy, the same for every change (a submission, a start, a
kill, an end, a removal):

1. under the manager lock: decide, and ``write(2)`` the change to the
   journal.  That write survives a kill -9 of the process; if it fails
   (ENOSPC, EIO), nothing changes and the caller gets `StorageError` (only
   a job's end, which has already happened, is kept and written later);
2. without the lock: ``fdatasync`` (group commit: one serves every thread
   waiting) when the change must be durable before it acts — a submission
   with ``durable=True``, a kill;
3. without the lock: act — the backend's ``start`` (a spawn, ``sbatch``),
   ``signal`` (``kill``, ``scancel``) — then take the lock again to record
   the outcome.

So no job runs and no signal is sent unless its record is written, and no
fsync, spawn, ``sbatch`` or ``scancel`` ever holds up another thread's
`get`.  Compaction writes its snapshot without the lock too.

The HTTP server (`make_server`) reads every connection in one thread, the
one that calls ``serve_forever()``; a connection gets a handler thread
(``pman-http``) only while it has a complete request in progress.
"""

__version__ = "0.1.0"

__all__ = [
    "JobManager", "PmanError", "JobNotFound", "JobConflict", "InvalidArgument",
    "StateLocked", "StateCorrupt", "StorageError", "Timeout", "BackendUnavailable", "SubmitRejected",
    "LocalBackend", "SlurmBackend", "PodmanBackend", "STATUSES", "make_server", "main",
    "pman", "CompatServer",
]
# Not exported: the persistence (_Store), process (_launch...) and HTTP
# handler internals, which may change between versions; and the backend
# protocol (_Backend, _Seen), which third-party backends may use but which
# is provisional.

import argparse
import atexit
import base64
import bisect
import collections
import contextlib
import email.utils
import errno
import fcntl
import fnmatch
import hashlib
import heapq
import math
import hmac
import http
import http.client
import http.server
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
from time import sleep as _sleep
from time import time as _wall

log = logging.getLogger(__name__)
# Request lines go to their own logger, so a server can show its start and
# stop lines without one line per request (`pman -v` shows both).
access_log = logging.getLogger("pman.access")


# ---------------------------------------------------------------------------
# Constants and clocks
# ---------------------------------------------------------------------------

NOTSTARTED = "notstarted"
STARTED = "started"
SUCCESS = "finishedSuccessfully"
ERROR = "finishedWithError"
UNDEFINED = "undefined"
STATUSES = (NOTSTARTED, STARTED, SUCCESS, ERROR, UNDEFINED)
# What a status filter takes (any case), in the library, over HTTP and on
# the command line: pman's five statuses, and the words a person types.
STATUS_ALIASES = dict({s.lower(): s for s in STATUSES}, queued=NOTSTARTED,
                      waiting=NOTSTARTED, running=STARTED, succeeded=SUCCESS,
                      success=SUCCESS, ok=SUCCESS, failed=ERROR)
ACTIVE = (NOTSTARTED, STARTED)

JID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
RESERVED_JIDS = frozenset({"cmd", "jobs", "hello", "openapi.json", "events", "groups", "pause",
                           "resume"})
# The fields pfcon sends with every job: recorded; only the podman backend
# acts on them (it runs the image, enforces the limits).
PFCON_FIELDS = ("number_of_workers", "cpu_limit", "memory_limit", "gpu_limit",
                "image", "type", "input_dir", "output_dir", "args_path_flags")

DEFAULT_GRACE = 5.0
# The signals that ask a job to end: a kill() of one is followed by SIGKILL
# after the grace (SIGKILL itself is final).  Any other is sent once.
ENDING_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGKILL})
_SENT_RE = re.compile(r"; SIG[A-Z0-9+-]+ sent on request at \S+$")   # the last one only
DEFAULT_GROUP = "default"   # the group of a job that names none
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
CHANGES_KEPT = 4096         # changes the feed remembers; an older cursor gets reset
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MAX_DEPTH = 64              # nesting levels of a job's meta (and extras) accepted
_MISSING = object()
TAIL_LINES, TAIL_BYTES = 1000, 65536


def _now():
    return datetime.now(timezone.utc).isoformat()


def _parse_time(stamp):
    return datetime.fromisoformat(stamp).timestamp()


def _time_since(stamp):
    return _wall() - _parse_time(stamp) if stamp else 0.0


def _drain(fd):
    try:
        while os.read(fd, 65536):
            pass
    except BlockingIOError:
        pass


# ---------------------------------------------------------------------------
# Exceptions
# ---------------------------------------------------------------------------

# Every exception the library raises (the HTTP layer's HTTPError never
# leaves it); the HTTP status of each is in one table, _HTTP_STATUS.

class PmanError(Exception):
    """Root of every error pman raises.  ``str(e)`` says what is wrong."""


class InvalidArgument(PmanError, ValueError):
    """A bad argument: an invalid jid, signal, command, env, cwd or option.
    Attribute: ``index``, the batch index of the bad spec when
    `JobManager.run_many` raised it, else None."""

    index = None

    def _in_batch(self, index):
        """This error as raised for the spec at *index* of a batch."""
        error = InvalidArgument("batch index %d: %s" % (index, self))
        error.index = index
        return error


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


class StorageError(PmanError, OSError):
    """The state directory could not record a change (ENOSPC, EIO...), so
    the change was not made: no job was started, no signal was sent.  The
    HTTP layer answers 507.  Attributes: ``path``, ``errno``."""

    def __init__(self, path, error):
        super().__init__(error.errno, "cannot write the state directory %s: %s"
                         % (path, error.strerror or error))
        self.path = path

    def __str__(self):
        return self.strerror


class BackendUnavailable(PmanError):
    """The backend cannot take jobs now (no ``sbatch``, the controller does
    not answer...).  The HTTP layer answers 503."""


class SubmitRejected(PmanError):
    """The backend refused this job; the message is the backend's own."""


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------

SHOWN_CHARS = 64            # how much of a bad value an error message quotes


def _shown(value):
    """A bad value as an error message quotes it: its repr, cut to about
    SHOWN_CHARS characters (a client may send a megabyte)."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


def check_jid(jid):
    """Return *jid* if it is a valid job id, else raise InvalidArgument."""
    if not isinstance(jid, str) or not JID_RE.fullmatch(jid):
        raise InvalidArgument(
            "invalid jid %s: it must be a string matching [A-Za-z0-9][A-Za-z0-9._-]{0,127}"
            % _shown(jid))
    if jid in RESERVED_JIDS:
        raise InvalidArgument("invalid jid %r: it is a reserved route name" % jid)
    return jid


def parse_signal(sig):
    """Turn 15, "15", "TERM" or "SIGTERM" into a signal number."""
    if isinstance(sig, bool):
        raise InvalidArgument("invalid signal %s" % _shown(sig))
    if isinstance(sig, str):
        name = sig.strip().upper()
        if not (name.isascii() and name.isdigit()):     # "\u00b2" is a digit to isdigit
            member = signal.Signals.__members__.get(
                name if name.startswith("SIG") else "SIG" + name)
            if member is None:
                raise InvalidArgument("unknown signal %s" % _shown(sig))
            return int(member)
        sig = int(name)
    if isinstance(sig, int) and 0 < sig < signal.NSIG:
        return int(sig)
    raise InvalidArgument("invalid signal %s" % _shown(sig))


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
        raise InvalidArgument("%s must be a number from 0 to %g, not %s"
                              % (name, MAX_SECONDS, _shown(value)))
    return value


def _check_count(name, value, allow_none=True):
    """*value* if it is a non-negative integer (or None, if allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument("%s must be a non-negative integer, not %s" % (name, _shown(value)))
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
    # Env values may be secrets: no message quotes one (nor an entry that
    # holds one); a key is quoted, as job objects list the keys anyway.
    if isinstance(env, (list, tuple)):
        pairs = {}
        for i, item in enumerate(env):
            if not isinstance(item, str) or "=" not in item:
                raise InvalidArgument("env entry %d must be a 'KEY=value' string, not %s"
                                      % (i, "one without '='" if isinstance(item, str)
                                         else "a " + type(item).__name__))
            key, _, value = item.partition("=")
            pairs[key] = value
        env = pairs
    if not isinstance(env, dict):
        raise InvalidArgument("env must be a dict or a list of 'KEY=value' strings, not a %s"
                              % type(env).__name__)
    for key, value in env.items():
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            raise InvalidArgument("invalid env key %s: keys are non-empty strings without "
                                  "'=' or NUL" % _shown(key))
        if not isinstance(value, str) or "\0" in value:
            raise InvalidArgument("invalid value of env %s: values are strings without NUL"
                                  % _shown(key))
    return dict(env)


# A checked submission: what run() and each spec of run_many() become
# before the manager's lock is taken (see _check_spec).  *sched* holds the
# scheduling fields that differ from their defaults (see _check_sched).
_Spec = collections.namedtuple("_Spec", "jid cmd argv auid meta env cwd timeout extras sched")
# The scheduling fields of a submission and their defaults (API.md).
SCHED_DEFAULTS = {"after": [], "after_any": [], "group": DEFAULT_GROUP, "priority": 0,
                  "begin": None, "hold": False, "retries": 0, "retry_delay": 1,
                  "cpus": 0, "memory": 0, "gpus": 0}
_SPEC_KEYS = frozenset(("cmd", "jid", "auid", "meta", "env", "cwd", "timeout", "extras")
                       ) | frozenset(SCHED_DEFAULTS)
GROUP_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_PRIORITY = 2 ** 31 - 1
MAX_RETRIES = 1000


def check_group(name):
    """Return *name* if it is a valid group name, else raise InvalidArgument."""
    if not isinstance(name, str) or not GROUP_RE.fullmatch(name):
        raise InvalidArgument("invalid group %s: it must be a string matching "
                              "[A-Za-z0-9][A-Za-z0-9._-]{0,63}" % _shown(name))
    return name


def check_priority(priority):
    if (isinstance(priority, bool) or not isinstance(priority, int)
            or not -MAX_PRIORITY <= priority <= MAX_PRIORITY):
        raise InvalidArgument("priority must be an integer from %d to %d, not %s"
                              % (-MAX_PRIORITY, MAX_PRIORITY, _shown(priority)))
    return priority


MAX_EPOCH = 253402300799        # 9999-12-31T23:59:59Z: every later time is out of range


def parse_begin(begin):
    """*begin* (ISO 8601 with an offset, or epoch seconds) as the ISO 8601
    text a record keeps; InvalidArgument if it is neither."""
    if isinstance(begin, (int, float)) and not isinstance(begin, bool):
        if not 0 <= begin <= MAX_EPOCH:
            raise InvalidArgument("begin must be epoch seconds from 0 to %d, not %s"
                                  % (MAX_EPOCH, _shown(begin)))
        return datetime.fromtimestamp(begin, timezone.utc).isoformat()
    if isinstance(begin, str):
        text = begin[:-1] + "+00:00" if begin[-1:] in ("Z", "z") else begin
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            when = None
        if when is not None and when.tzinfo is not None:
            try:
                # An offset can carry a time past 9999 in UTC, or before 1970.
                if not 0 <= when.timestamp() <= MAX_EPOCH:
                    raise OverflowError
            except (OverflowError, ValueError):
                raise InvalidArgument("begin must be from 1970 to 9999 (UTC), not %s"
                                      % _shown(begin)) from None
            return when.isoformat()
        raise InvalidArgument("begin must be ISO 8601 with an offset (2026-12-06T14:05:00"
                              "+01:00) or epoch seconds, not %s" % _shown(begin))
    raise InvalidArgument("begin must be ISO 8601 with an offset or epoch seconds, not %s"
                          % _shown(begin))


def _check_jid_list(name, jids):
    """A dependency list: jids (an integer is taken as its decimal string,
    as for a jid; one string stands for a list of one), without repeats."""
    if isinstance(jids, (str, int)) and not isinstance(jids, bool):
        jids = [jids]
    if not isinstance(jids, (list, tuple)):
        raise InvalidArgument("%s must be a list of jids, not %s" % (name, _shown(jids)))
    out = {}
    for jid in jids:
        if isinstance(jid, int) and not isinstance(jid, bool):
            jid = str(jid)
        try:
            check_jid(jid)
        except InvalidArgument as e:
            raise InvalidArgument("%s: %s" % (name, e)) from None
        out[jid] = None
    return list(out)


def _check_request(name, value):
    """A resource request: a whole number (MiB for memory), 0 for none."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 40:
        raise InvalidArgument("%s must be a whole number%s, not %s" % (
            name, " of MiB" if name == "memory" else "", _shown(value)))
    return value


def _pfcon_requests(extras):
    """The requests that pfcon's limits in *extras* stand for: cpu_limit in
    millicores (rounded up to whole CPUs), memory_limit in MiB, gpu_limit.
    A limit that is not a number is left to the backend's checks."""
    out = {}
    for field, name, scale in (("cpu_limit", "cpus", 1000), ("memory_limit", "memory", 1),
                               ("gpu_limit", "gpus", 1)):
        value = (extras or {}).get(field)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (
                0 < value < 1 << 40):
            out[name] = math.ceil(value / scale)
    return out


def _check_sched(after=None, after_any=None, group=None, priority=0, begin=None, hold=False,
                 retries=0, retry_delay=1, cpus=None, memory=None, gpus=None):
    """The scheduling fields of a submission that differ from their
    defaults, checked; InvalidArgument names the first bad one."""
    sched = {"cpus": _check_request("cpus", cpus), "memory": _check_request("memory", memory),
             "gpus": _check_request("gpus", gpus)}
    if after is not None:
        sched["after"] = _check_jid_list("after", after)
    if after_any is not None:
        sched["after_any"] = [j for j in _check_jid_list("after_any", after_any)
                              if j not in sched.get("after", ())]
    if group is not None:
        sched["group"] = check_group(group)
    if priority is not None:
        sched["priority"] = check_priority(priority)
    if begin is not None:
        sched["begin"] = parse_begin(begin)
    if hold is not None:
        if not isinstance(hold, bool):
            raise InvalidArgument("hold must be true or false, not %s" % _shown(hold))
        sched["hold"] = hold
    if retries is not None:
        if (isinstance(retries, bool) or not isinstance(retries, int)
                or not 0 <= retries <= MAX_RETRIES):
            raise InvalidArgument("retries must be an integer from 0 to %d, not %s"
                                  % (MAX_RETRIES, _shown(retries)))
        sched["retries"] = retries
    if retry_delay is not None:
        sched["retry_delay"] = _check_number("retry_delay", retry_delay, allow_none=False)
    return {k: v for k, v in sched.items() if v != SCHED_DEFAULTS[k]}


def _check_spec(cmd, *, jid=None, auid="", meta=None, env=None, cwd=None, timeout=None,
                extras=None, **sched):
    """The one set of rules for a submission, single or batched: return a
    _Spec, or raise InvalidArgument.  A jid of None is generated later.
    *sched*: the scheduling fields (SCHED_DEFAULTS)."""
    argv, display = _check_cmd(cmd)
    for name, value in _pfcon_requests(extras).items():
        if sched.get(name) is None:
            sched[name] = value
    sched = _check_sched(**sched)
    if auid is not None and not isinstance(auid, str):
        raise InvalidArgument("auid must be a string")
    if meta is not None and not isinstance(meta, dict):
        raise InvalidArgument("meta must be a JSON object (dict)")
    if extras is not None and not isinstance(extras, dict):
        raise InvalidArgument("extras must be a dict")
    env = _check_env(env)
    if cwd is not None and not isinstance(cwd, str):
        raise InvalidArgument("cwd must be a string")
    _check_number("timeout", timeout)
    meta, extras = _stored_copies(meta or {}, extras)
    if jid is not None:
        check_jid(jid)
    return _Spec(jid, display, argv, auid or "", meta, env, cwd, timeout, extras or {}, sched)


def _check_specs(specs):
    """`_check_spec` for each dict of a `JobManager.run_many` batch; the
    InvalidArgument of a bad one names its index."""
    if isinstance(specs, (str, bytes, dict)) or not hasattr(specs, "__iter__"):
        raise InvalidArgument("specs must be a list of dicts, not %s" % _shown(specs))
    checked = []
    for index, spec in enumerate(specs):
        try:
            if not isinstance(spec, dict):
                raise InvalidArgument("a spec must be a dict of run()'s keyword "
                                      "arguments plus 'cmd', not %s" % _shown(spec))
            unknown = sorted(set(spec) - _SPEC_KEYS, key=str)
            if unknown:
                raise InvalidArgument("unknown key(s) %s: a spec takes %s" % (
                    _shown(unknown), ", ".join(sorted(_SPEC_KEYS))))
            if "cmd" not in spec:
                raise InvalidArgument("'cmd' is missing")
            checked.append(_check_spec(**spec))
        except InvalidArgument as e:
            raise e._in_batch(index) from None
    return checked


def _check_cmd(cmd):
    """(argv, the command as shown) of a shell string (argv None) or an
    argv list; InvalidArgument if it is neither, or holds a NUL."""
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
    return argv, display


def _stored_copies(meta, extras):
    """Copies of *meta* and *extras* as the records hold them (their JSON
    read back: the caller may change its dicts after run()), or
    InvalidArgument.  The depth is bounded so that what is stored can be
    listed, searched and serialized in any thread; *extras* may hold a
    command-dialect client's whole meta one level down (sent_meta)."""
    if not (meta or extras):
        return {}, None
    for name, value, depth in (("meta", meta, MAX_DEPTH), ("extras", extras, MAX_DEPTH + 1)):
        if not _depth_ok(value, depth):
            raise InvalidArgument("%s is nested too deeply: at most %d levels"
                                  % (name, depth))
    try:
        text = json.dumps([meta, extras], allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidArgument("meta is not storable as JSON: %s" % (
            "NaN and infinite numbers are not JSON" if isinstance(e, ValueError)
            else e)) from None
    return json.loads(text)


# ---------------------------------------------------------------------------
# The job record
# ---------------------------------------------------------------------------

# Persisted fields, in the order they are written.  jid, status and seq come
# first so that a loader can index a line without parsing it (_LINE_RE).
_FIELDS = ("jid", "status", "seq", "message", "returncode", "pid", "cmd", "argv",
           "auid", "meta", "env", "cwd", "timeout", "extras", "submitted",
           "started", "ended", "ident", "kill_signal", "kill_reason", "backend_id")
# Scheduling fields, written only when they differ from SCHED_DEFAULTS (a
# record without them is a plain FIFO job's, as every earlier build wrote):
# those of the submission, then `attempts` (the earlier attempts of a job
# with retries), `pending` (the [jid, any] dependencies not yet resolved),
# `retry_at` (epoch seconds of the next attempt) and `waiting` (why a
# queued job waits, as of the moment its line was made: see _Scheduler.why).
_SCHED_FIELDS = tuple(SCHED_DEFAULTS) + ("attempts", "pending", "retry_at", "assigned",
                                          "usage")
_LINE_RE = re.compile(r'\{"jid": "([A-Za-z0-9._-]+)", "status": "(\w+)", "seq": (\d+),')


class _Job:
    """A job that is queued or running (a finished one is kept as its line,
    see _is_finished).  All access MUST hold the manager's lock."""

    # pidfd: the backend's (LocalBackend); starting: handed to the backend,
    # whose start() has not returned yet; timers: entries of the manager's
    # timer heap armed for this run.
    # sched: the _Scheduler that holds the job while it waits; queued: its
    # entry in that scheduler's heaps (see _Scheduler).
    __slots__ = _FIELDS + _SCHED_FIELDS + ("pidfd", "spawned_at", "escalate_at", "starting",
                                           "timers", "kill_sent", "sched", "queued")

    def __init__(self, **fields):
        for name in _FIELDS + _SCHED_FIELDS:
            setattr(self, name, fields.get(name))
        self.pidfd = self.spawned_at = self.escalate_at = self.sched = self.queued = None
        self.starting = False
        # kill_sent: a signal of the journaled kill went out (a restarted
        # manager sends it again), so the end is the kill's, not the job's.
        self.kill_sent = bool(self.kill_signal)
        self.timers = 0

    def line(self):
        rec = {name: getattr(self, name) for name in _FIELDS}
        for name in _SCHED_FIELDS:
            value = getattr(self, name)
            if value is not None:
                rec[name] = value
        if self.sched is not None and self.status == NOTSTARTED:
            rec["waiting"] = self.sched.why(self)
        return _encode_record(rec)

    def get(self, name):
        """A scheduling field's value, its default when the record has none."""
        value = getattr(self, name)
        return SCHED_DEFAULTS.get(name) if value is None else value


# allow_nan=False: a record holding NaN or Infinity is never written (strict
# JSON readers, pman's own loader among them, refuse it).
_encode_record = json.JSONEncoder(allow_nan=False).encode


_NONE = type(None)
# What a loader accepts in each persisted field: exact types, so that a bool
# never passes for an int.
_FIELD_TYPES = {
    "jid": {str}, "status": {str}, "seq": {int}, "message": {str},
    "returncode": {int, _NONE}, "pid": {int, _NONE}, "cmd": {str}, "argv": {list, _NONE},
    "auid": {str}, "meta": {dict}, "env": {dict, _NONE}, "cwd": {str, _NONE},
    "timeout": {int, float, _NONE}, "extras": {dict, _NONE}, "submitted": {str, _NONE},
    "started": {str, _NONE}, "ended": {str, _NONE}, "ident": {list, _NONE},
    "kill_signal": {int, _NONE}, "kill_reason": {str, _NONE}, "backend_id": {str, _NONE},
    "after": {list}, "after_any": {list}, "group": {str}, "priority": {int},
    "begin": {str}, "hold": {bool}, "retries": {int}, "retry_delay": {int, float},
    "attempts": {list}, "pending": {list}, "retry_at": {int, float}, "waiting": {str},
    "cpus": {int}, "memory": {int}, "gpus": {int}, "assigned": {dict}, "usage": {dict}}
# backend_id was added after format 1 was out; the scheduling fields are
# written only when they are not their defaults.
_REQUIRED = frozenset(_FIELD_TYPES) - {"backend_id", "waiting"} - set(_SCHED_FIELDS)


# An earlier attempt of a job with retries (see JobManager._retry).
_ATTEMPT_TYPES = {"returncode": {int, _NONE}, "started": {str, _NONE}, "ended": {str, _NONE},
                  "message": {str}}


def _is_time(value):
    """*value* is None or an ISO 8601 time."""
    try:
        return value is None or bool(datetime.fromisoformat(value))
    except ValueError:
        return False


def _listed(value):
    """*value* if it is a list, else a list that no check passes."""
    return value if type(value) is list else [None]


def _record_problem(rec, deep=True):
    """Why the parsed state line *rec* is not a job record that pman could
    have written, or None.  Every field's type is checked, so that a record
    that loads can always be listed, searched and served.  *deep* False:
    the line holds too few '{' and '[' to nest deeper than MAX_DEPTH."""
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
    for name in ("after", "after_any"):
        if name in rec and not all(type(j) is str and JID_RE.fullmatch(j) for j in rec[name]):
            return "%r is not a list of jids" % name
    if "pending" in rec and not all(
            type(p) is list and len(p) == 2 and type(p[0]) is str and JID_RE.fullmatch(p[0])
            and type(p[1]) is bool for p in rec["pending"]):
        return "'pending' is not a list of [jid, bool]"
    for attempt in rec.get("attempts", ()):
        if not (type(attempt) is dict and attempt.keys() == _ATTEMPT_TYPES.keys() and all(
                type(attempt[k]) in types for k, types in _ATTEMPT_TYPES.items())
                and all(_is_time(attempt[k]) for k in ("started", "ended"))):
            return "'attempts' is not a list of attempts"
    for name in ("cpus", "memory", "gpus"):
        if rec.get(name, 0) < 0:
            return "negative %r" % name
    assigned = rec.get("assigned", {})
    if not (assigned.keys() <= {"cpus", "gpus", "memory", "memory_enforced", "cgroup"}
            and type(assigned.get("memory_enforced", False)) is bool
            and type(assigned.get("cgroup", "")) is str
            and all(type(c) is int and c >= 0 for c in _listed(assigned.get("cpus", [])))
            and all(type(g) is str for g in _listed(assigned.get("gpus", [])))
            and type(assigned.get("memory", 0)) is int and assigned.get("memory", 0) >= 0):
        return "'assigned' is not cores, GPU ids and MiB"
    if "group" in rec and not GROUP_RE.fullmatch(rec["group"]):
        return "invalid group"
    if "begin" in rec:
        try:
            parse_begin(rec["begin"])
        except InvalidArgument as e:
            return "'begin': %s" % e
    if "retry_at" in rec and not 0 <= rec["retry_at"] <= MAX_EPOCH:
        return "'retry_at' is out of range"
    if deep and ((rec["meta"] and not _depth_ok(rec["meta"], MAX_DEPTH))
                 or (rec["extras"] and not _depth_ok(rec["extras"], MAX_DEPTH + 1))):
        return "meta nested too deeply"
    return None


# A stored job (an "entry" of JobManager._jobs) is a _Job while queued or
# running and, once finished, its JSON line (a str): compact, and already
# serialized for the journal and the HTTP layer.  These helpers are the
# only code that tells the two apart.

def _is_finished(entry):
    return isinstance(entry, str)


def _line_of(entry):
    return entry if isinstance(entry, str) else entry.line()


def _line_status(line):
    return _LINE_RE.match(line).group(2)


def _line_seq(line):
    return int(_LINE_RE.match(line).group(3))


def _record(entry):
    """A fresh record dict (a deep copy) of a stored job."""
    return json.loads(_line_of(entry))


def _entry_status(entry):
    return _line_status(entry) if _is_finished(entry) else entry.status


# ---------------------------------------------------------------------------
# Persistence: the snapshot and the journal
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
        with open(fd, "w", encoding="utf-8") as f:
            f.writelines(chunks)
            f.flush()
            os.fsync(fd)
    except BaseException:
        os.unlink(tmp)
        raise
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


# Format 2 of the snapshot: each line (header included) is the JSON object
# pman keeps, with the CRC-32 of its UTF-8 text as a last member, so that the
# file stays JSON Lines and damage that still parses is found:
#   {"jid": "a", ..., "backend_id": null, "crc": "1c291ca3"}
# Journal lines are plain records.  Every line is parsed and checked on loading.
_CRC_HEAD = b', "crc": "'
# Where a damaged newline joined two snapshot lines: the byte after a checksum.
_JOINED_RE = re.compile(rb'(?<=, "crc": "[0-9a-f]{8}"\})[^\n]')


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
    # Each level of nesting opens with a '{' or '[' of the text (those inside
    # strings only add to the count): a line with MAX_DEPTH of them at most
    # nests no deeper.
    deep = line.count("{") + line.count("[") > MAX_DEPTH
    if isinstance(obj, dict) and len(obj) == 1 and "forget" in obj:
        jids = obj["forget"]
        ok = isinstance(jids, list) and all(isinstance(j, str) for j in jids)
        return None if ok else "bad forget line"
    if isinstance(obj, dict) and len(obj) == 1 and "batch" in obj:   # run_many(): one line
        records = obj["batch"]
        if not isinstance(records, list) or not records:
            return "bad batch line"
        for record in records:
            problem = _record_problem(record, deep)
            if problem is None and list(record)[:3] != ["jid", "status", "seq"]:
                problem = "fields out of order"
            if problem is not None:
                return "batch: " + problem
        return None
    problem = _record_problem(obj, deep)
    # The fields read later without parsing (_LINE_RE) must be the parsed
    # ones: a checked jid, status and seq have one JSON spelling each.
    if problem is None and not line.startswith('{"jid": "%s", "status": "%s", "seq": %d,' % (
            obj["jid"], obj["status"], obj["seq"])):
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
    """The snapshot and its append-only journals: `load` replays them,
    `append` writes one line now (its callers hold the manager lock, so
    the journal's order is the changes' order), `sync` makes lines durable,
    `rotate` and `write_snapshot` compact.

    Lines are JSON objects: a job record (see _FIELDS), ``{"batch":
    [record, ...]}`` (a run_many() submission, one line so that it is
    recorded whole or not at all; journals only) or ``{"forget": [jid,
    ...]}``.  A torn last journal line (a crash mid-write) is dropped; any
    other bad line is reported and its file kept aside.
    """

    def __init__(self, path, strict=False):
        self.path = path
        self.strict = strict
        self._lock = threading.Lock()           # guards all below
        self._cond = threading.Condition(self._lock)
        self._pending = []                      # lines a failed write left behind
        self._appended = 0                      # ticket of the last append
        self._synced = 0                        # tickets <= this are on disk
        self._flushing = False                  # a thread is in fdatasync
        self._fd = None
        self._unsynced_fds = []                 # older journals with unsynced lines
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
        cleanup = [os.path.join(self.path, name) for name in os.listdir(self.path)
                   if ".tmp-" in name]          # leftovers of an interrupted write
        aside = []                              # (path, why) of damaged files
        snap_gen, replayed = self._load_snapshot(jobs, aside)
        snap_gen, journaled = self._load_journals(jobs, aside, cleanup, snap_gen)
        if aside and self.strict:
            raise StateCorrupt(aside[0][0], aside[0][1] + " (opened with strict=True: "
                               "nothing was changed)")
        for path, why in aside:
            self._set_aside(path, why)
        for path in cleanup:
            os.unlink(path)
        self.generation = snap_gen
        return jobs, self._next_seq, replayed or journaled

    def _load_snapshot(self, jobs, aside):
        """Replay the snapshot, if any, into *jobs*; return (its generation,
        whether a fresh one should be written).  A damaged snapshot goes
        to *aside*."""
        snap = os.path.join(self.path, SNAPSHOT)
        if not os.path.exists(snap):
            return 0, False
        snap_gen, replayed = 0, False
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
        if bad or torn[0]:      # written atomically: any damage came from outside
            aside.append((snap, "damaged snapshot (%d bad lines%s)" % (
                len(bad), ", truncated" if torn[0] else "")))
            replayed = True
        return snap_gen, replayed

    def _load_journals(self, jobs, aside, cleanup, snap_gen):
        """Replay the journals of generation *snap_gen* and later into
        *jobs* (older ones go to *cleanup*, damaged ones to *aside*);
        return (the last generation, whether any held a change)."""
        replayed = False
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
        return snap_gen, replayed

    def _apply(self, lines, jobs, bad):
        """Replay checked lines (see _lines) into *jobs* (ordered); collect
        bad lines; note the jids whose last line is active in self.active.
        Returns the number of lines."""
        count = 0
        for line in lines:
            count += 1
            m = _LINE_RE.match(line)
            if m:
                jid, status, seq = m.groups()
                old = jobs.get(jid)
                if old is not None and _line_seq(old) != int(seq):
                    del jobs[jid]           # a re-run moves to the end
                jobs[jid] = line
                if status in ACTIVE:
                    self.active.add(jid)
                else:
                    self.active.discard(jid)
                self._next_seq = max(self._next_seq, int(seq) + 1)
                continue
            try:
                change = json.loads(line)
                if "batch" in change:   # run_many(): every record of it, or (torn) none
                    self._apply([json.dumps(rec) for rec in change["batch"]], jobs, bad)
                    continue
                for jid in change["forget"]:
                    jobs.pop(jid, None)
                    self.active.discard(jid)
            except (ValueError, KeyError, TypeError):
                bad.append(line[:40])
        return count

    @staticmethod
    def _lines(f, bad, torn):
        """Yield the lines of binary file *f* that can be trusted, as str:
        each parsed and checked field by field, and a format-2 snapshot
        line's checksum matched first.  A snapshot line whose checksum fails
        may be two lines that a damaged newline joined: the parts that carry
        their own matching checksum are kept.  Bad lines go to *bad*; a last
        line without its newline is torn (``torn[0]``) and dropped."""
        for raw in f:
            if raw[-1:] != b"\n":
                torn[0] = True
                return
            if len(raw) <= 1:
                continue
            body = _unframe(raw)
            if body is False:
                bad.append(raw[:40])
                parts = [_unframe(part + b"\n") for part in _JOINED_RE.split(raw[:-1])]
                parts = [part for part in parts if part] if len(parts) > 1 else []
            else:
                parts = [raw[:-1] if body is None else body]
            for part in parts:
                try:
                    line = part.decode("utf-8")
                    ok = _line_problem(_loads(line), line) is None
                except (ValueError, RecursionError):    # UnicodeDecodeError included
                    ok = False
                if ok:
                    yield line
                else:
                    bad.append(part[:40])

    # -- writing ----------------------------------------------------------

    def open_journal(self, gen):
        """Append to journal *gen* from now on.  The old journal's fd stays
        open until its last lines are synced.  Caller holds self._lock or
        is the only user."""
        fd = os.open(self._journal_path(gen),
                     os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        old, self._fd = self._fd, fd
        self.generation = gen
        self.journal_lines = 0
        if old is not None:
            if self._flushing or self._synced < self._appended:
                self._unsynced_fds.append(old)      # closed by the next sync
            else:
                os.close(old)

    def append(self, line, *, must=False):
        """Write one line to the journal now and return its ticket for
        `sync`.  The write(2) survives a kill -9 of this process; only
        `sync` makes it survive a crash of the machine.

        With ``must=True`` (write-ahead: the change must not happen unless
        it is recorded) a failed write raises StorageError and records
        nothing.  Otherwise the line is kept in order and written again by
        the next `sync`, which raises until the disk takes it."""
        data = (line + "\n").encode("utf-8")
        with self._lock:
            try:
                self._write_pending()       # earlier lines first: keep the order
                self._write(data)
            except OSError as e:
                if must:
                    raise StorageError(self.path, e) from None
                if not self._pending:
                    log.warning("cannot write the journal in %s (%s): the change is "
                                "kept in memory and written again at the next sync",
                                self.path, e.strerror or e)
                self._pending.append(data)
            self._appended += 1
            self.journal_lines += 1
            return self._appended

    def _write(self, data):
        """Append *data* whole or not at all (a failed write is cut off, so
        no torn line is left before the next one).  Caller holds
        self._lock."""
        start = os.fstat(self._fd).st_size
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError:
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                pass
            raise

    def _write_pending(self):
        """Write the lines an earlier failure left behind.  Caller holds
        self._lock."""
        while self._pending:
            self._write(self._pending[0])
            del self._pending[0]

    def sync(self, ticket=None):
        """Return once the line *ticket* (default: every line so far) is on
        disk: one fdatasync, outside the lock, serves every caller waiting
        (group commit).  Raises StorageError if the disk refuses."""
        with self._lock:
            if ticket is None:
                ticket = self._appended
            while self._synced < ticket:
                if self._flushing:
                    self._cond.wait()
                    continue
                self._flushing = True
                try:
                    self._write_pending()
                    upto, fds = self._appended, self._unsynced_fds + [self._fd]
                    self._lock.release()
                    try:
                        for fd in fds:
                            os.fdatasync(fd)
                    finally:
                        self._lock.acquire()
                    for fd in fds[:-1]:     # journals before a rotation: done
                        self._unsynced_fds.remove(fd)
                        os.close(fd)
                except OSError as e:
                    raise StorageError(self.path, e) from None
                finally:
                    self._flushing = False
                    self._cond.notify_all()
                self._synced = max(self._synced, upto)

    def rotate(self):
        """Start a new journal and return its generation; the next `sync`
        makes the old one's last lines durable too.  The caller holds the
        manager lock, so the lines it snapshots next are exactly the state
        the old journals describe.  No I/O waits here."""
        with self._lock:
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
# Processes: identity, exit codes and the wrapper shell
# ---------------------------------------------------------------------------

# The wrapper that runs every job, as ``sh -c WRAPPER sh pman-job SEQ EXITS
# CWD CMD...``, records its exit status in EXITS.  The command travels as a
# positional parameter, never as script text, and sees none of the
# wrapper's (as under ``sh -c CMD``).  `trap : TERM ...` is a handler, not
# an ignore: the job resets it (no inherited SIG_IGN), while the wrapper
# survives any signal sent to the group whose default would end it
# (_WRAP_TRAPPED: a kill, or a HUP or USR1 sent on request) and waits for
# the job to record its status; the spawn resets every other disposition
# (_SIGDEF).  No user code runs in the
# wrapper's own shell: the job runs in a child, so nothing it does (exec,
# trap, exit, a builtin loop the TERM handler would keep alive) reaches the
# shell that records its status.  The job sees its environment as given:
# the wrapper sets no variable (j is a function, unset first), and OLDPWD,
# which the `cd` to CWD sets to the manager's directory, is put back as the
# job's environment had it (as ``env -C CWD sh -c CMD`` leaves it).
_WRAP_TRAPPED = ("TERM", "INT", "QUIT", "HUP", "USR1", "USR2", "ALRM", "VTALRM", "PROF", "XCPU",
                 "XFSZ", "IO", "PWR", "SYS", "TRAP", "ABRT", "BUS", "FPE", "ILL", "SEGV",
                 "PIPE")
_WRAP_HEAD = ('trap : ' + " ".join(_WRAP_TRAPPED) + '; j() { unset -f j; if [ -n "$4" ]; then '
              'set -- "${OLDPWD+x$OLDPWD}" "$@"; cd -- "$5" || return 126; '
              'case $1 in x*) OLDPWD=${1#x};; *) unset OLDPWD;; esac; shift; fi; shift 4; ')
_WRAP_TAIL = '; }; j "$@"; set -- $? "$2" "$3"; echo "$2 $1" >>"$3"; exit "$1"'
# A shell command runs as its own `sh -c CMD` (its $$, `local`, a `kill
# $$` are those of sh -c), an argv through exec (a program, never a
# builtin of the same name).
_WRAP_SHELL = _WRAP_HEAD + '/bin/sh -c "$1" sh' + _WRAP_TAIL
_WRAP_ARGV = _WRAP_HEAD + '(exec "$@")' + _WRAP_TAIL
# A job that is one program and its words (see _direct_words) runs as the
# wrapper's own child (vfork + exec), as `sh -c CMD` would run it: no shell
# code of the job's runs in the wrapper.  A TERM that lands before the exec
# is caught and lost, as in a subshell's instant after its fork, and is
# sent again (JobManager._deliver).
_WRAP_DIRECT = _WRAP_HEAD + '"$@"' + _WRAP_TAIL
# Every wrapper that a build of pman has started, by its exact text: the
# current ones, then those of earlier builds (some ``sh -c WRAPPER pman-job
# SEQ EXITS CMD...``), whose jobs a newer build re-adopts after an upgrade.
_WRAPPERS = frozenset(w.encode() for w in (
    _WRAP_SHELL, _WRAP_ARGV, _WRAP_DIRECT,
    *(w.replace('trap : ' + " ".join(_WRAP_TRAPPED), 'trap : TERM', 1)
      for w in (_WRAP_SHELL, _WRAP_ARGV, _WRAP_DIRECT)),
    'trap : TERM; t=$2; f=$3; d=$4; shift 4; if [ -n "$d" ] && ! cd -- "$d"; then r=126; '
    'else (unset t f d r; eval "shift; $1"); r=$?; fi; echo "$t $r" >>"$f"; exit $r',
    'trap : TERM; t=$2; f=$3; d=$4; shift 4; if [ -n "$d" ] && ! cd -- "$d"; then r=126; '
    'else (unset t f d r; "$@"); r=$?; fi; echo "$t $r" >>"$f"; exit $r',
    'trap : TERM; t=$2; f=$3; d=$4; shift 4; if [ -n "$d" ] && ! cd -- "$d"; then r=126; '
    'else "$@"; r=$?; fi; echo "$t $r" >>"$f"; exit $r',
    'trap "echo $2 \\"\\$?\\" >>\'$3\'" EXIT; trap "exit 143" TERM; '
    'if [ -n "$4" ] && ! cd -- "$4"; then exit 126; fi; eval "shift 5; $5"',
    'trap : TERM; (eval "$3"); r=$?; echo "$1 $r" >>"$2"; exit $r',
    'trap : TERM; t=$1; f=$2; shift 2; ("$@"); r=$?; echo "$t $r" >>"$f"; exit $r'))
_SIGDEF = frozenset(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}
# The signals `kill` sends that leave the wrapper alive: those it traps, and
# those whose default ignores or stops a process; an earlier build's
# wrapper (re-adopted) traps only TERM.
_HARMLESS = ("CHLD", "URG", "WINCH", "CONT", "STOP", "TSTP", "TTIN", "TTOU", "KILL")
_SENDABLE = frozenset(getattr(signal, "SIG" + name) for name in _WRAP_TRAPPED + _HARMLESS
                      if hasattr(signal, "SIG" + name))
_SENDABLE_EARLIER = frozenset(getattr(signal, "SIG" + name) for name in ("TERM",) + _HARMLESS
                              if hasattr(signal, "SIG" + name))
_CURRENT_WRAPPERS = frozenset(w.encode() for w in (_WRAP_SHELL, _WRAP_ARGV, _WRAP_DIRECT))


def _boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


_BOOT_ID = _boot_id()


def _proc_stat(pid):
    """(start time in clock ticks, state letter, process group) of *pid*,
    or None.  Fields are read after the last ')' because the command name
    may contain any character."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2:].split()
    if len(fields) < 20:        # the process is gone (ESRCH reads as empty)
        return None
    return int(fields[19]), fields[0].decode(), int(fields[2])


def _identity(pid):
    stat = _proc_stat(pid)
    return None if stat is None else [stat[0], _BOOT_ID]


def _cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def _wrapper_seq(argv, exits_path):
    """The seq of the job whose wrapper has command line *argv* (a list of
    bytes) and writes to *exits_path*, or None if it is no such wrapper.
    The wrapper's subshell has the same command line: tell them apart by
    the process group (the wrapper leads it)."""
    if len(argv) > 6 and argv[1] == b"-c" and argv[2] in _WRAPPERS:
        i = 4 if argv[3] == b"sh" else 3
        if (argv[i] == b"pman-job" and argv[i + 1].isdigit()
                and argv[i + 2] == exits_path.encode()):
            return int(argv[i + 1])
    return None


def _is_alive(pid, ident, seq, exits_path):
    """True if process *pid* still runs (zombies are gone) and is the one
    recorded: same start time and boot (*ident*), or, with no identity
    recorded, the wrapper of job *seq*, recognized by its command line."""
    stat = _proc_stat(pid) if pid else None
    if stat is None or stat[1] == "Z":
        return False
    if ident is not None and ident[0] is not None:
        return ident == [stat[0], _BOOT_ID]
    return _wrapper_seq(_cmdline(pid), exits_path) == seq


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
    if fd is not None:
        os.close(fd)
    return fd is not None


_HAVE_PIDFD = _probe_pidfd()   # Linux 5.3+; else the reaper polls


def _open_log(path, flags=0):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | flags, 0o600)
    if fd < 3:      # our own 0-2 are closed: keep clear of the child's
        fd, old = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3), fd
        os.close(old)
    return fd


def _exit_status(code):
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
    is lost while no manager watches (one O_APPEND write: atomic for a
    line this short).  It is emptied when no job can still write to it."""

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
                    # An earlier build's own-shell wrapper wrote the shell's
                    # untruncated `exit N`; its process exited with N's low byte.
                    self._codes[int(parts[0])] = int(parts[1]) & 0xFF
        return self._codes.get(seq)

    def max_seq(self):
        """The highest seq in the file (0 if none)."""
        self.code(0)
        return max(self._codes, default=0)

    def clear(self):
        """Empty the file.  Only when no wrapper is alive to append."""
        with open(self.path, "wb"):
            pass
        self._codes, self._offset = {}, 0


# Plain words: no quoting, expansion, glob, redirection, operator, comment
# or assignment (the first word has no '='), blanks between them only.
_PLAIN_CMD_RE = re.compile(r"[ \t]*[A-Za-z0-9_@%+,./:-]+(?:[ \t]+[A-Za-z0-9_@%+,./:=-]+)*[ \t]*\Z")
# Words that a shell runs itself (builtins of dash, bash and POSIX, and
# reserved words): such a job keeps its subshell, so that none of its
# commands runs in the shell that records its status.
_SHELL_WORDS = frozenset("""
    . : [ [[ ]] ! { } alias bg bind break builtin caller case cd chdir command compgen
    complete compopt continue coproc declare dirs disown do done echo elif else
    enable esac eval exec exit export false fc fg fi for function getopts hash help history
    if in jobs kill let local logout mapfile popd printf pushd pwd read readarray
    readonly return select set shift shopt source suspend test then time times trap
    true type typeset ulimit umask unalias unset until wait while""".split())
# Only a shell known to run "$@" as sh -c CMD would (dash: Debian's /bin/sh).
_DIRECT_SHELL = os.path.basename(os.path.realpath("/bin/sh")) == "dash"


def _direct_words(job):
    """The words of *job* if its wrapper can run it without a subshell
    (_WRAP_DIRECT), else None: an argv, or a shell command of plain words
    (run as ``sh -c`` would split them), whose program is no shell word."""
    if not _DIRECT_SHELL:
        return None
    if job.argv is not None:
        words = job.argv
    elif _PLAIN_CMD_RE.match(job.cmd):
        words = job.cmd.split()
    else:
        return None
    if not words or words[0] in _SHELL_WORDS:
        return None
    return words


# The shell a memory job runs through, as the wrapper's child: it moves
# itself into the job's cgroup ($1: its cgroup.procs), then execs the job
# (its `sh -c CMD`, or its argv), keeping its pid.  So every process of the
# job starts inside the cgroup, and the wrapper that records the exit code
# stays outside it, where the cgroup's OOM killer never picks it.
_CGROUP_ENTER = 'echo $$ >"$1" || exit 126; shift; exec "$@"'


def _wrapped_argv(job, exits_path, cgroup_procs=None):
    """The wrapper shell's argv for *job*: the command travels as data.
    With *cgroup_procs*, the job enters that cgroup first (_CGROUP_ENTER)."""
    words = _direct_words(job)
    if cgroup_procs is not None:
        script = _WRAP_ARGV
        words = ["/bin/sh", "-c", _CGROUP_ENTER, "sh", cgroup_procs] + (
            job.argv if job.argv is not None else ["/bin/sh", "-c", job.cmd, "sh"])
    elif words is not None:
        script = _WRAP_DIRECT
    elif job.argv is not None:
        script, words = _WRAP_ARGV, job.argv
    else:
        script, words = _WRAP_SHELL, [job.cmd]
    return ["/bin/sh", "-c", script, "sh", "pman-job", str(job.seq), exits_path,
            os.path.abspath(job.cwd) if job.cwd else ""] + words


# ---------------------------------------------------------------------------
# The backend seam and the local backend
# ---------------------------------------------------------------------------

# A signal the manager decided to send (JobManager._signal -> _deliver):
# *ticket* is its journal line, *previous* the job's (kill_signal,
# kill_reason) before it, *kind* the timer that sent it (None: a request),
# *grace* None when no escalation follows.
_Kill = collections.namedtuple("_Kill", "job sig grace ticket previous kind")


class _Waker:
    """A self-pipe to interrupt a backend's wait."""

    def __init__(self):
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._closed = False
        self._lock = threading.Lock()   # a late wake never writes to a closed (reused) fd

    def wake(self):
        with self._lock:
            if self._closed:
                return
            try:
                os.write(self.w, b"x")
            except BlockingIOError:
                pass

    def sleep(self, timeout):
        """Sleep up to *timeout* s (None: forever) or until woken."""
        if select.select([self.r], [], [], timeout)[0]:
            _drain(self.r)

    def close(self):
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self.r)
                os.close(self.w)


QUEUED, RUNNING, ENDED, NEVER = "queued", "running", "ended", "never"


class _Seen(collections.namedtuple(
        "_Seen", "state message code status started pid ident backend_id usage assigned oom",
        defaults=(None,) * 10)):
    """A backend's finding about one job:

    - ``state``: QUEUED (waiting in the backend's own queue), RUNNING,
      ENDED, or NEVER (it never started: the manager queues it again);
    - ``message``: words for the record, or None to keep the record's;
    - ``code``: ENDED: the exit code, None if none is known; a negative
      code is a signal that pman did not send;
    - ``status``: ENDED: the status, when the backend knows better than the
      code (SLURM's final states); None derives it from the code;
    - ``started``: when it started (ISO 8601 UTC), if the backend knows;
    - ``pid``, ``ident``, ``backend_id``: the backend's handle on the job
      (set by start, or found by recover), None to keep the record's;
    - ``usage``: ENDED: what the job used (the record's ``usage``);
    - ``assigned``: facts merged into the record's ``assigned`` (start:
      whether its memory is enforced, and where);
    - ``oom``: ENDED: the memory limit (MiB) of a job whose cgroup counted
      an out-of-memory kill, else None."""

    __slots__ = ()


class _Backend:
    """Where jobs run: the protocol between `JobManager` and a backend
    (`LocalBackend`, `SlurmBackend`, `PodmanBackend`).  Provisional: a third-party backend
    subclasses this and implements the methods without a default.

    A backend never changes a job: it reads the job's fields and returns a
    `_Seen` that the manager applies.  ``start`` and ``signal`` are called
    WITHOUT the manager's lock (they may be slow: ``sbatch``, ``scancel``),
    ``wait`` and ``close`` too; every other method with it held, so they
    must not block."""

    name = "?"
    resend_window = 0.0     # see JobManager._deliver
    local_resources = False     # its jobs use this machine's CPUs, memory, GPUs
    enforced = ()           # the pfcon limits it enforces (job objects list the rest)

    def open(self, state_dir, log_dir, log_path):
        """Bind to a manager's state: *state_dir* for the backend's own
        files, *log_dir* and ``log_path(jid, stream)`` for the jobs' logs.
        Raise BackendUnavailable if the backend cannot work here."""
        raise NotImplementedError

    def seq_floor(self):
        """The lowest seq a new job may take (a backend whose records are
        keyed by seq keeps them unique across lost journal lines)."""
        return 1

    def admit(self, cmd, env, extras):
        """Called by ``run()`` WITHOUT the lock, before anything is
        journaled: raise InvalidArgument (400) for a job this backend can
        never run, BackendUnavailable (503) if it can take none now."""

    def start(self, job, env):
        """Launch *job* (``env``: the merged environment, or None for the
        manager's own; its cwd exists) and return ``_Seen(RUNNING or QUEUED,
        message, pid=, ident=, backend_id=)``.  The manager has journaled the
        job first.  Raise OSError if it cannot start, SubmitRejected if the
        backend refuses it, BackendUnavailable if it cannot take jobs now."""
        raise NotImplementedError

    def watch(self, job):
        """Begin tracking a started (or re-adopted) job."""
        raise NotImplementedError

    def unwatch(self, job):
        """Stop tracking a job that has ended; release what it held."""
        raise NotImplementedError

    def wait(self, timeout):
        """Block up to *timeout* s (None: no limit) until a watched job may
        have changed or `wake` is called; return the jobs to `check`."""
        raise NotImplementedError

    def check(self, job):
        """None if nothing changed; else a `_Seen`: RUNNING once a job the
        backend queued starts, QUEUED with a new message, or ENDED."""
        raise NotImplementedError

    def signal(self, job, sig):
        """Deliver *sig* to the job; False if it is already gone."""
        raise NotImplementedError

    def recover(self, job):
        """After a restart, for a job the backend was given: a `_Seen`:
        RUNNING or QUEUED (watch it), ENDED, or NEVER (a job handed over,
        ``backend_id == ""``, that the backend never got)."""
        raise NotImplementedError

    def recover_queued(self, job):
        """After a restart, for a job journaled as queued in pman: NEVER
        unless the backend can tell it was started after all."""
        return _Seen(NEVER)

    def refuses(self, job, sig):
        """Why *sig* must not be sent to running *job* (a signal that does
        not ask it to end), or None."""
        return None

    def idle(self):
        """No job is running (a moment for housekeeping)."""

    def wake(self):
        """Interrupt `wait`."""
        raise NotImplementedError

    def close(self):
        """Release everything `open` took; jobs keep running."""
        raise NotImplementedError


_BACKEND_METHODS = ("open", "admit", "start", "watch", "unwatch", "wait", "check", "signal",
                    "recover", "recover_queued", "seq_floor", "idle", "wake", "close")


@contextlib.contextmanager
def _affinity(cores):
    """Run the block with this thread pinned to *cores* (None: as it is):
    a child spawned meanwhile starts with that mask, before any of its
    code runs, and every process it starts inherits it.  Affinity is per
    thread, so the rest of the manager is untouched."""
    if not cores:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _cgroup_name(state_dir):
    return "pman-" + hashlib.sha256(state_dir.encode()).hexdigest()[:12]


def _memory_cgroup(proc_cgroup="/proc/self/cgroup", root="/sys/fs/cgroup"):
    """(the directory of this process's memory cgroup, True if it is cgroup
    v1's) from *proc_cgroup*: v1's memory hierarchy, else the v2 unified
    one; (None, False) if neither is listed."""
    try:
        with open(proc_cgroup) as f:
            lines = [line.split(":", 2) for line in f.read().splitlines()]
    except OSError:
        return None, False
    for hier, names, path in lines:
        if "memory" in names.split(","):
            return os.path.join(root, "memory", path.strip("/")), True
    for hier, names, path in lines:
        if hier == "0" and not names:
            return os.path.join(root, path.strip("/")), False
    return None, False


def _job_cgroups(state_dir, proc_cgroup="/proc/self/cgroup", root="/sys/fs/cgroup"):
    """The directory under which this manager makes its jobs' memory
    cgroups (made with the first), or None where it cannot: a child of
    this process's own memory cgroup, cgroup v1's memory hierarchy, else
    v2's where the memory controller is delegated to it.  Named from the
    state directory, so that two managers never share one."""
    name = _cgroup_name(state_dir)
    parent, v1 = _memory_cgroup(proc_cgroup, root)
    try:
        if v1:
            usable = (os.path.exists(os.path.join(parent, "memory.limit_in_bytes"))
                      and os.access(parent, os.W_OK))
            return os.path.join(parent, name) if usable else None
        if parent is None:
            return None
        with open(os.path.join(parent, "cgroup.controllers")) as f:
            if "memory" not in f.read().split():
                return None
        # v2 lets a cgroup with processes (ours) pass a controller on only
        # where it is delegated (already on) or at the root.
        with open(os.path.join(parent, "cgroup.subtree_control")) as f:
            if "memory" not in f.read().split():
                _write_file(os.path.join(parent, "cgroup.subtree_control"), "+memory")
    except (OSError, ValueError, IndexError):
        return None
    return os.path.join(parent, name) if os.access(parent, os.W_OK) else None


def _write_file(path, text):
    with open(path, "w") as f:
        f.write(text)


def _cgroup_facts(path):
    """(out-of-memory kills, peak bytes) that the memory cgroup *path* (v1
    or v2) counted, each None where it cannot tell."""
    kills = peak = None
    for name in ("memory.oom_control", "memory.events"):
        try:
            with open(os.path.join(path, name)) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        kills = int(value)
            break
        except (OSError, ValueError):
            continue
    for name in ("memory.max_usage_in_bytes", "memory.peak"):
        try:
            with open(os.path.join(path, name)) as f:
                peak = int(f.read())
            break
        except (OSError, ValueError):
            continue
    return kills, peak


def _usage(rusage=None, peak=None):
    """A finished job's ``usage``: CPU seconds from the wrapper's *rusage*
    (its own and its waited-for descendants'), max_rss in MiB from the
    cgroup's *peak* (bytes), else the largest single process (wait4)."""
    usage = {"cpu_user": None, "cpu_system": None, "max_rss": None, "max_rss_from": None}
    if rusage is not None:
        usage.update(cpu_user=round(rusage.ru_utime, 3), cpu_system=round(rusage.ru_stime, 3),
                     max_rss=round(rusage.ru_maxrss / 1024, 1), max_rss_from="wait4")
    if peak is not None:
        usage.update(max_rss=round(peak / 1048576, 1), max_rss_from="cgroup")
    return usage


def _rmdir(path):
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as e:    # EBUSY: a process of the job outlived it; swept when idle
        log.debug("cannot remove cgroup %s yet: %s", path, e)


class LocalBackend(_Backend):
    """Jobs as process groups on this machine (the default backend): each
    runs under one of three wrapper shells (_WRAP_SHELL, _WRAP_ARGV,
    _WRAP_DIRECT) that appends its exit code to the ``exits`` file, and is
    reaped through a pidfd."""

    name = "local"
    resend_window = RESEND_WINDOW
    local_resources = True
    cgroups = None      # where jobs' memory cgroups are made (see _job_cgroups), or None

    @property
    def enforced(self):
        # Cores by affinity, GPUs by CUDA_VISIBLE_DEVICES, memory by a
        # cgroup where one can be made.
        return ("cpu_limit", "gpu_limit") + (("memory_limit",) if self.cgroups else ())

    def open(self, state_dir, log_dir, log_path):
        self.log_path = log_path
        self.cgroups = _job_cgroups(state_dir)
        self._cgroup_name = _cgroup_name(state_dir)
        self._spent = []    # cgroups of jobs that ended while no manager ran
        self._exits = _ExitLog(os.path.join(state_dir, "exits"))
        self._orphans = None            # seq -> pid of wrappers found at startup
        self._waker = _Waker()
        self._no_pidfd = {}         # jid -> job of those without a pidfd: polled
        # Guards _children: a pid is signalled only while it is our unreaped
        # child (so it cannot have been reused), and reaped under it too.
        self._reap_lock = threading.Lock()
        self._children = set()
        # epoll itself, not selectors: pidfds exist only on Linux, which has it.
        self._epoll = select.epoll() if _HAVE_PIDFD else None
        self._pidfds = {}           # pidfd -> its job, of those registered in _epoll
        if self._epoll is not None:
            self._epoll.register(self._waker.r, select.EPOLLIN)

    def seq_floor(self):
        return self._exits.max_seq() + 1

    def refuses(self, job, sig):
        argv = _cmdline(job.pid) if sig not in _SENDABLE_EARLIER else []
        if len(argv) > 2 and argv[2] in _WRAPPERS and argv[2] not in _CURRENT_WRAPPERS:
            return ("job %s was started by an earlier pman, whose wrapper shell would die "
                    "of %s and lose the exit code" % (job.jid, signal_name(sig)))
        return None

    def start(self, job, env):
        if job.argv is not None:
            exe = job.argv[0]
            if "/" in exe:
                found = os.path.join(job.cwd or "", exe)
                found = found if os.access(found, os.X_OK) and not os.path.isdir(found) else None
            else:
                found = shutil.which(exe, path=(env or os.environ).get("PATH", os.defpath))
            if found is None:
                raise FileNotFoundError(errno.ENOENT, "no such executable", exe)
        stdout = stderr = cgroup = None
        facts = None
        if job.get("memory"):
            cgroup = self._make_cgroup(job)
            facts = {"memory_enforced": cgroup is not None}
            if cgroup is not None:
                facts["cgroup"] = cgroup
        argv = _wrapped_argv(job, self._exits.path,
                             cgroup and os.path.join(cgroup, "cgroup.procs"))
        try:
            stdout = _open_log(self.log_path(job.jid, "stdout"))
            stderr = _open_log(self.log_path(job.jid, "stderr"))
            # posix_spawn, not Popen: it resets every signal disposition in
            # the child (a manager started with SIGINT ignored must not pass
            # that on) without a preexec_fn, and returns once the child's
            # exec has begun (its command line may not be readable yet).
            with _affinity((job.assigned or {}).get("cpus")):
                pid = os.posix_spawn(
                    "/bin/sh", argv, os.environ if env is None else env,
                    file_actions=[(os.POSIX_SPAWN_DUP2, stdout, 1),
                                  (os.POSIX_SPAWN_DUP2, stderr, 2),
                                  (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)],
                    setsid=True, setsigdef=_SIGDEF, setsigmask=())
            with self._reap_lock:
                self._children.add(pid)
        except BaseException:
            if cgroup is not None:
                _rmdir(cgroup)
            raise
        finally:
            for fd in (stdout, stderr):
                if fd is not None:
                    os.close(fd)
        return _Seen(RUNNING, "running (pid %d)" % pid, pid=pid,
                     ident=_identity(pid), assigned=facts)

    def _make_cgroup(self, job):
        """A new memory cgroup limited to *job*'s request, or None (logged)
        where none can be made: the job runs, its memory not enforced.  No
        swap beyond the limit, as under podman's --memory-swap."""
        if self.cgroups is None:
            return None
        path = os.path.join(self.cgroups, "job-%d" % job.seq)
        limit = str(job.get("memory") * 1048576)
        try:
            try:
                os.mkdir(self.cgroups)
            except FileExistsError:
                pass
            else:   # v2: its children get the controller
                control = os.path.join(self.cgroups, "cgroup.subtree_control")
                if os.path.exists(control):
                    _write_file(control, "+memory")
            _rmdir(path)    # a crash's leftover: its counts are not this job's
            os.mkdir(path)
            if os.path.exists(os.path.join(path, "memory.limit_in_bytes")):
                _write_file(os.path.join(path, "memory.limit_in_bytes"), limit)
                if os.path.exists(os.path.join(path, "memory.memsw.limit_in_bytes")):
                    _write_file(os.path.join(path, "memory.memsw.limit_in_bytes"), limit)
            else:
                _write_file(os.path.join(path, "memory.max"), limit)
                if os.path.exists(os.path.join(path, "memory.swap.max")):
                    _write_file(os.path.join(path, "memory.swap.max"), "0")
        except OSError as e:
            log.warning("job %s: its memory is not enforced: cannot make cgroup %s: %s",
                        job.jid, path, e)
            _rmdir(path)
            return None
        return path

    def _cgroup_of(self, job):
        """The memory cgroup of *job*, or None: as recorded, else (a crash
        before its start was recorded) where this manager would make it."""
        path = (job.assigned or {}).get("cgroup")
        if path is not None and not (
                path.startswith("/sys/fs/cgroup/") and os.path.normpath(path) == path
                and path.endswith("/%s/job-%d" % (self._cgroup_name, job.seq))):
            path = None     # not one this manager makes: never read nor removed
        if path is None and job.get("memory") and self.cgroups is not None:
            path = os.path.join(self.cgroups, "job-%d" % job.seq)
        return path if path is not None and os.path.isdir(path) else None

    def _ended(self, job, code, rusage=None):
        """A `_Seen` of *job*'s end: its *code*, usage (*rusage*: the
        wrapper's, if we reaped it) and what its cgroup counted."""
        path = self._cgroup_of(job)
        kills, peak = _cgroup_facts(path) if path else (None, None)
        return _Seen(ENDED, code=code, usage=_usage(rusage, peak),
                     oom=job.get("memory") if kills else None)

    def idle(self):
        """No job is running: empty the exit log (every code in it is in
        the journal by now), and remove the cgroups left behind (a crash's,
        or those a job's lingering process kept)."""
        if os.path.getsize(self._exits.path) > EXIT_LOG_MAX:
            self._exits.clear()
        if self.cgroups is not None:
            try:
                names = os.listdir(self.cgroups)
            except OSError:
                names = ()
            for name in names:
                if name.startswith("job-"):
                    _rmdir(os.path.join(self.cgroups, name))

    def watch(self, job):
        if self._epoll is not None:
            job.pidfd = _pidfd(job.pid)     # None (EMFILE...): polled instead
            if job.pidfd is not None:
                self._epoll.register(job.pidfd, select.EPOLLIN)
                self._pidfds[job.pidfd] = job
                return
        self._no_pidfd[job.jid] = job
        self._waker.wake()      # start polling it

    def unwatch(self, job):
        self._no_pidfd.pop(job.jid, None)
        if job.pidfd is not None:
            if self._epoll is not None:
                self._epoll.unregister(job.pidfd)
                del self._pidfds[job.pidfd]
            os.close(job.pidfd)
            job.pidfd = None
        path = self._cgroup_of(job)     # its end is journaled: its counts are kept
        if path is not None:
            _rmdir(path)

    def wait(self, timeout):
        # Recovery has journaled the ends these cgroups told of by now.
        while self._spent:
            _rmdir(self._spent.pop())
        polled = list(self._no_pidfd.values())     # not every watched job at each wake
        if polled:      # no pidfd for these: poll them, 10 ms apart
            timeout = POLL_INTERVAL if timeout is None else min(POLL_INTERVAL, timeout)
        if self._epoll is None:
            self._waker.sleep(timeout)
            return polled
        for fd, _ in self._epoll.poll(timeout):    # a timeout rounds up to 1 ms, never to 0
            if fd == self._waker.r:
                _drain(fd)
            else:   # one lookup: another thread may unwatch the job meanwhile
                job = self._pidfds.get(fd)
                if job is not None:     # else unwatched since it was reported
                    polled.append(job)
        return polled

    def check(self, job):
        # wait4, not waitpid: its rusage is the job's CPU time and largest
        # process (the wrapper's own and its waited-for descendants').
        with self._reap_lock:
            if job.pid in self._children:
                try:
                    pid, status, rusage = os.wait4(job.pid, os.WNOHANG)
                except ChildProcessError:   # reaped by someone else's waitpid(-1)
                    self._children.discard(job.pid)
                    return self._ended(job, self._exits.code(job.seq))
                if pid == 0:
                    return None
                self._children.discard(job.pid)
                return self._ended(job, os.waitstatus_to_exitcode(status), rusage)
        if _is_alive(job.pid, job.ident, job.seq, self._exits.path):
            return None
        code, rusage = self._exits.code(job.seq), None
        try:    # our own child, from an earlier manager in this process
            pid, status, rusage = os.wait4(job.pid, os.WNOHANG)
            if pid and code is None:
                code = os.waitstatus_to_exitcode(status)
            rusage = rusage if pid else None
        except ChildProcessError:
            pass
        return self._ended(job, code, rusage)

    def signal(self, job, sig):
        with self._reap_lock:
            if (job.pid not in self._children
                    and not _is_alive(job.pid, job.ident, job.seq, self._exits.path)):
                return False        # gone, or re-adopted and gone: never a stranger
            try:
                os.killpg(job.pid, sig)
            except ProcessLookupError:
                return False
            return True

    def recover(self, job):
        if job.pid is None:         # handed over, then the manager died
            return self._find(job)
        if _is_alive(job.pid, job.ident, job.seq, self._exits.path):
            return _Seen(RUNNING)
        return self._recovered_end(job, self._exits.code(job.seq))

    def _recovered_end(self, job, code):
        """The end of a job that ended while no manager ran: what its
        cgroup still says, which is removed once that end is journaled."""
        seen = self._ended(job, code)
        path = self._cgroup_of(job)
        if path is not None:
            self._spent.append(path)
        return seen

    def recover_queued(self, job):
        return self._find(job)

    def _find(self, job):
        """A job whose spawn was never confirmed on disk: find its wrapper
        (``pman-job <seq>`` on our exit log, leading its process group) or
        its exit code, so that it never runs twice; NEVER if it never ran."""
        if self._orphans is None:       # one scan of /proc per startup
            self._orphans = {}
            for name in os.listdir("/proc"):
                if name.isdigit():
                    seq = _wrapper_seq(_cmdline(int(name)), self._exits.path)
                    stat = _proc_stat(int(name)) if seq is not None else None
                    if stat is not None and stat[2] == int(name):   # the leader
                        self._orphans[seq] = int(name)
        pid = self._orphans.get(job.seq)
        if pid is not None:
            ident = _identity(pid)
            if _is_alive(pid, ident, job.seq, self._exits.path):
                return _Seen(RUNNING, "running (pid %d), found after a restart" % pid,
                             pid=pid, ident=ident)
        code = self._exits.code(job.seq)
        if code is not None:
            return self._recovered_end(job, code)
        if job.ident is not None and job.ident[1] != _BOOT_ID:
            return _Seen(ENDED)     # handed over before a reboot: it may have run
        return _Seen(NEVER)

    def wake(self):
        self._waker.wake()

    def close(self):
        for job in list(self._pidfds.values()):
            os.close(job.pidfd)
            job.pidfd = None
        if self._epoll is not None:
            self._epoll.close()
        self._waker.close()
        if self.cgroups is not None:
            _rmdir(self.cgroups)    # unless running jobs' cgroups are in it


# ---------------------------------------------------------------------------
# The SLURM backend
# ---------------------------------------------------------------------------

# SLURM job states -> pman statuses (the rest of the terminal states: error).
_SLURM_PENDING = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD",
                  "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED", "STOPPED"}
_SLURM_RUNNING = {"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING"}
_SLURM_ERROR = {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED", "REVOKED", "SPECIAL_EXIT"}


class _PolledBackend(_Backend):
    """A backend that learns what its jobs do by asking one command about
    all of them at once (``squeue``, ``podman inspect``), at an interval
    that adapts: MIN_POLL after a change, growing to MAX_POLL while nothing
    changes.  A subclass's ``wait`` calls the helpers below."""

    MIN_POLL, MAX_POLL = 0.2, 5.0

    def open(self, state_dir, log_dir, log_path):
        self.log_dir, self.log_path = log_dir, log_path
        self._waker = _Waker()
        self._watched = {}              # jid -> job
        self._states = {}               # backend_id -> what the last poll found
        self._interval = self.MIN_POLL
        self._last_poll = 0.0

    def watch(self, job):
        self._watched[job.jid] = job
        self._interval = self.MIN_POLL
        self.wake()

    def wake(self):
        self._waker.wake()

    def close(self):
        self._waker.close()

    def _env_file(self, job, env, end):
        """*env* in a file (0600) beside the job's logs, each variable
        followed by *end*: values never travel on a command line."""
        path = os.path.join(self.log_dir, job.jid + ".env")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join("%s=%s%s" % (key, value, end) for key, value in env.items()))
        return path

    def _due_jobs(self, timeout):
        """Sleep until the next poll is due (at most *timeout*, or until
        `wake`); the watched jobs to poll, or None if woken too early: never
        poll faster than MIN_POLL."""
        due = self._last_poll + self._interval - _time()
        self._waker.sleep(max(0.0, due if timeout is None else min(due, timeout)))
        if _time() < self._last_poll + self.MIN_POLL:
            return None
        self._last_poll = _time()
        return list(self._watched.values())

    def _polled(self, changed):
        """The next interval, after a poll that found *changed* jobs."""
        self._interval = (self.MIN_POLL if changed
                          else min(self.MAX_POLL, self._interval * 1.5))
        return changed

    def _poll_failed(self, what, error):
        log.warning("polling %s failed (will retry): %s", what, error)
        self._interval = self.MAX_POLL
        return []


class SlurmBackend(_PolledBackend):
    """Jobs as SLURM batch jobs, driven through ``sbatch``, ``squeue``,
    ``sacct`` and ``scancel``.  The submit host needs SLURM's client
    commands; the state directory (logs) must be on a file system the
    compute nodes share.  Timeouts are enforced by pman; ``--time`` is a
    backstop."""

    name = "slurm"
    COMMAND_TIMEOUT = 30.0

    def __init__(self, partition=None, sbatch_args=()):
        if isinstance(sbatch_args, str):
            sbatch_args = shlex.split(sbatch_args)
        self.partition = partition
        self.sbatch_args = list(sbatch_args)
        self.calls = collections.Counter()   # scheduler commands run, by name

    def open(self, state_dir, log_dir, log_path):
        for tool in ("sbatch", "squeue", "scancel"):
            if shutil.which(tool) is None:
                raise BackendUnavailable("the slurm backend needs %r on PATH, and it is "
                                         "missing: install SLURM's client commands" % tool)
        super().open(state_dir, log_dir, log_path)
        # _states: backend_id -> (state, reason, code, signal, start)

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
        argv = ["sbatch", "--parsable", "-J", job.jid,
                "-o", self.log_path(job.jid, "stdout"), "-e", self.log_path(job.jid, "stderr")]
        if job.cwd is not None:
            argv += ["--chdir", job.cwd]
        if self.partition:
            argv += ["--partition", self.partition]
        # SLURM admits, assigns and enforces these itself (pfcon's limits
        # are mapped onto them at submission).
        if job.get("cpus"):
            argv.append("--cpus-per-task=%d" % job.cpus)
        if job.get("memory"):
            argv.append("--mem=%dM" % job.memory)
        if job.get("gpus"):
            argv.append("--gres=gpu:%d" % job.gpus)
        if job.timeout is not None:     # a backstop: pman kills at the timeout itself
            argv.append("--time=%d" % (math.ceil(job.timeout / 60) + 1))
        if env:     # NUL-separated: --export would split values on commas
            argv.append("--export-file=" + self._env_file(job, env, "\0"))
        argv += self.sbatch_args
        argv += ["--wrap", job.cmd if job.argv is None else shlex.join(job.argv)]
        out = self._run(argv)
        job_id = out.stdout.strip().split(";")[0]
        if not job_id.isdigit():
            raise SubmitRejected("sbatch printed no job id: %r" % out.stdout[:200])
        self._interval = self.MIN_POLL
        return _Seen(QUEUED, "submitted to SLURM as job %s" % job_id, backend_id=job_id)

    def unwatch(self, job):
        self._watched.pop(job.jid, None)
        self._states.pop(job.backend_id, None)
        try:
            os.unlink(os.path.join(self.log_dir, job.jid + ".env"))
        except FileNotFoundError:
            pass

    def poll(self, ids):
        """{id: (state, reason, code, signal, start)} for *ids*, in one
        squeue call (and one sacct call for jobs squeue has forgotten)."""
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
        jobs = self._due_jobs(timeout)
        if jobs is None:
            return []
        ids = [j.backend_id for j in jobs if j.backend_id]
        try:
            states = self.poll(ids)
        except BackendUnavailable as e:
            return self._poll_failed("SLURM", e)
        # A change of state, reason or code; not of a pending job's estimated
        # start time, which the backfill scheduler rewrites all the time.
        changed = [j for j in jobs if (states.get(j.backend_id) or ())[:4]
                   != (self._states.get(j.backend_id) or ())[:4]]
        self._states.update(states)
        return self._polled(changed)

    def check(self, job):
        got = self._states.get(job.backend_id)
        if got is None:
            return None
        state, reason, code, sig, start = got
        base = state.split()[0].rstrip("+")
        if base in _SLURM_PENDING:
            message = "pending in SLURM as job %s (%s)" % (
                job.backend_id, reason if reason and reason != "None" else base)
            return None if job.message == message else _Seen(QUEUED, message)
        if base in _SLURM_RUNNING:
            if job.status == STARTED:
                return None
            return _Seen(RUNNING, "running in SLURM as job %s" % job.backend_id,
                         started=self._started(job, start))
        started = self._started(job, start)    # it may have run between two polls
        what = "SLURM job %s %s%s" % (job.backend_id, base,
                                      " (%s)" % reason if reason and reason != "None" else "")
        if base == "COMPLETED" and code == 0 and not sig:
            return _Seen(ENDED, "%s: exited with code 0" % what, 0, SUCCESS, started)
        if base in _SLURM_ERROR or base == "COMPLETED":
            if sig:
                return _Seen(ENDED, "%s: ended by %s" % (what, signal_name(sig)), -sig,
                             ERROR, started)
            if base == "CANCELLED" or code is None or (base != "FAILED" and code == 0):
                return _Seen(ENDED, "%s: no exit code is known" % what, None, ERROR, started)
            return _Seen(ENDED, "%s: exited with code %d" % (what, code), code, ERROR, started)
        return _Seen(ENDED, "%s: unknown SLURM state" % what, None, UNDEFINED, started)

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

    def recover(self, job):
        backend_id = job.backend_id
        if not backend_id:
            # A crash between sbatch and saving its id: find the job by name,
            # submitted no earlier than the record says.
            out = self._run(["squeue", "-t", "all", "-h", "--name", job.jid,
                             "-O", "JobID:|,SubmitTime:"], check=False)
            since = (datetime.fromisoformat(job.submitted).astimezone()
                     .strftime("%Y-%m-%dT%H:%M:%S") if job.submitted else "")
            ids = [f.split("|")[0].strip() for f in out.stdout.splitlines()
                   if f.split("|")[-1].strip() >= since]
            if not ids:
                return _Seen(NEVER)         # never submitted: queue it again
            backend_id = max(ids, key=int)
        # Whether it runs yet, the next poll says.
        return _Seen(RUNNING if job.status == STARTED else QUEUED, backend_id=backend_id)


# ---------------------------------------------------------------------------
# The podman backend
# ---------------------------------------------------------------------------

# Container states -> what the poll makes of them (the rest: not yet, or gone soon).
_PODMAN_RUNNING = {"running", "paused", "stopping"}
_PODMAN_ENDED = {"exited", "stopped"}
# A container image reference: never an option (podman would read "-x" as one).
_IMAGE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,511}")
_GONE = ("gone",)           # a poll's word for "podman has no such container"


class _ContainerSpec:
    """What one job asks of the podman backend, read from its *extras*
    with pman 3.x's conventions for ChRIS plugins and checked
    (InvalidArgument names what is wrong): ``image``, ``command`` (the
    container's), ``options`` (of ``podman run``, for its limits and
    mounts), and ``indir`` and ``outdir`` (the host directories mounted,
    under *storebase*).  Runs no podman and touches no file."""

    INCOMING, OUTGOING = "/share/incoming", "/share/outgoing"
    MIN_MEMORY = 6              # MiB: podman refuses less

    def __init__(self, cmd, env, extras, storebase):
        self.storebase = storebase
        self.image = extras.get("image")
        if self.image is None:
            raise InvalidArgument("'image' is required on the podman backend: each job "
                                  "runs in a container of that image")
        if not isinstance(self.image, str) or not _IMAGE_RE.fullmatch(self.image):
            raise InvalidArgument("invalid image %s" % _shown(self.image))
        self.options = self._limits(extras)
        kind, flags = extras.get("type"), extras.get("args_path_flags") or []
        if kind not in (None, "fs", "ds", "ts"):
            raise InvalidArgument("type must be 'fs', 'ds' or 'ts', not %s" % _shown(kind))
        if (not isinstance(flags, (list, tuple))
                or not all(isinstance(f, str) for f in flags)):
            raise InvalidArgument("args_path_flags must be a list of strings, not %s"
                                  % _shown(flags))
        if isinstance(cmd, str):
            self.command = ["/bin/sh", "-c", cmd]
        else:       # argv: the word after each path flag (past argv[0]) is replaced
            self.command = list(cmd)
            for i in range(1, len(cmd) - 1):
                if self.command[i] in flags:
                    self.command[i + 1] = self.INCOMING
        self._mount(extras, kind)
        if kind == "ds":
            self.command.append(self.INCOMING)
        if kind is not None:
            self.command.append(self.OUTGOING)
        for key, value in (env or {}).items():
            if "\n" in key or "\n" in value or key != key.strip() or key.startswith("#"):
                raise InvalidArgument("env %s: on the podman backend keys and values cannot "
                                      "hold a newline, nor keys start with '#' or have "
                                      "spaces at either end" % _shown(key))

    def _limits(self, extras):
        """The run options of pfcon's resource fields (one container: more
        workers are refused).  GPUs and cores are the manager's to assign
        (see PodmanBackend.start)."""
        workers, gpus = extras.get("number_of_workers"), extras.get("gpu_limit")
        if workers is not None and (isinstance(workers, bool) or workers != 1):
            raise InvalidArgument("number_of_workers must be 1 on the podman backend (one "
                                  "container per job), not %s" % _shown(workers))
        if gpus is not None and (isinstance(gpus, bool) or not isinstance(gpus, (int, float))
                                 or gpus < 0):
            raise InvalidArgument("gpu_limit must be a number, not %s" % _shown(gpus))
        options = []
        for field, low in (("cpu_limit", 0), ("memory_limit", self.MIN_MEMORY)):
            value = extras.get(field)
            if value is None or value == 0:
                continue
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not low <= value < 1 << 40):
                raise InvalidArgument("%s must be a positive number%s, not %s" % (
                    field, " of MiB, at least %d" % low if low else " of millicores",
                    _shown(value)))
            if field == "cpu_limit":
                options.append("--cpus=%g" % (value / 1000))
            else:       # a hard limit, swap included (a reservation stops nothing)
                size = int(value * 1048576)
                options += ["--memory=%db" % size, "--memory-swap=%db" % size]
        return options

    def _mount(self, extras, kind):
        """Mount input_dir (read-only) and output_dir, given or needed by
        the plugin's *kind*."""
        self.indir = self.outdir = None
        for field, target, needed in (("input_dir", self.INCOMING, kind in ("ds", "ts")),
                                      ("output_dir", self.OUTGOING, kind is not None)):
            if extras.get(field) is None and not needed:
                continue
            path = self._dir(extras, field)
            self.options.append("--mount=type=bind,source=%s,target=%s%s" % (
                path, target, ",ro=true" if target == self.INCOMING else ""))
            if target == self.OUTGOING:
                self.outdir = path
            else:
                self.indir = path

    def _dir(self, extras, field):
        """The host directory that *field* (``input_dir``/``output_dir``)
        names under the storebase; refused if it escapes it."""
        value = extras.get(field)
        if not isinstance(value, str) or not value.strip("/"):
            raise InvalidArgument("%r must name a directory under the storebase, not %s"
                                  % (field, _shown(value)))
        if self.storebase is None:
            raise InvalidArgument("%r needs a storebase, and this server has none: start "
                                  "it with --storebase DIR" % field)
        path = os.path.realpath(os.path.join(self.storebase, value.strip("/")))
        if not path.startswith(self.storebase + os.sep):
            raise InvalidArgument("%r %s escapes the storebase" % (field, _shown(value)))
        if "," in path or "\n" in path:
            raise InvalidArgument("%r %s: podman's --mount cannot take a path with ',' "
                                  "or a newline" % (field, _shown(value)))
        return path


class PodmanBackend(_PolledBackend):
    """Jobs as containers, driven through the ``podman`` command line, with
    pman 3.x's conventions for ChRIS plugins (see README.rst, "Running
    containers").

    - Name: ``pman-<tag>-<jid>``, *tag* a hash of the state directory, so
      two managers never collide; labels ``pman.state``, ``pman.jid`` and
      ``pman.seq`` tell this run of the jid from any other.
    - ``start`` is ``podman run -d --pull=never --log-driver=passthrough``:
      the container writes straight into the job's log files, which go on
      being written while no manager runs.
    - The exit code is the container's own, as podman records it.
    - A container is removed (``podman rm``) once its outcome is recorded.

    ``runtime`` is podman's ``--runtime`` (default: podman's own);
    ``podman_args`` extra ``podman run`` options (a list, or one
    shell-quoted string); ``storebase`` the directory that ``input_dir``
    and ``output_dir`` are relative to."""

    name = "podman"
    local_resources = True
    enforced = ("cpu_limit", "memory_limit", "gpu_limit", "number_of_workers")
    MIN_POLL, MAX_POLL = 0.1, 1.0
    COMMAND_TIMEOUT = 60.0
    # podman run options pman relies on: never from podman_args.
    _OWN_OPTIONS = frozenset({"--rm", "--name", "--log-driver", "--pull", "-d", "--detach",
                              "--replace", "-t", "--tty", "-i", "--interactive", "-a",
                              "--attach", "--restart"})
    _FORMAT = ('{"name": {{json .Name}}, "id": {{json .ID}}, "state": {{json .State}}, '
               '"labels": {{json .Config.Labels}}}')

    def __init__(self, runtime=None, podman_args=(), storebase=None, *, podman="podman"):
        if isinstance(podman_args, str):
            try:
                podman_args = shlex.split(podman_args)
            except ValueError as e:
                raise InvalidArgument("podman_args %s: %s" % (_shown(podman_args), e)) from None
        if runtime is not None and (not isinstance(runtime, str) or not runtime
                                    or runtime.startswith("-")):
            raise InvalidArgument("runtime must be the name or path of an OCI runtime, not %s"
                                  % _shown(runtime))
        for arg in podman_args:
            if not isinstance(arg, str):
                raise InvalidArgument("podman_args must be strings, not %s" % _shown(arg))
            if arg.split("=", 1)[0] in self._OWN_OPTIONS:
                raise InvalidArgument("podman_args cannot hold %s: pman sets it (the name, "
                                      "logs, pulls and removal are its own)" % _shown(arg))
        if storebase is not None:
            if not isinstance(storebase, str) or not os.path.isdir(storebase):
                raise InvalidArgument("storebase must be an existing directory, not %s"
                                      % _shown(storebase))
            storebase = os.path.realpath(storebase)
            if "," in storebase or "\n" in storebase:
                raise InvalidArgument("storebase %s: podman's --mount cannot take a path "
                                      "with ',' or a newline" % _shown(storebase))
        self.runtime = runtime
        self.podman_args = list(podman_args)
        self.storebase = storebase
        self.podman = podman
        self.calls = collections.Counter()   # podman subcommands run, by name

    def open(self, state_dir, log_dir, log_path):
        if shutil.which(self.podman) is None:
            log.warning("the podman backend needs %r on PATH, and it is missing: every "
                        "submission is refused (503) until it is installed", self.podman)
        state_dir = os.path.realpath(state_dir)
        self.tag = hashlib.sha256(state_dir.encode()).hexdigest()[:10]
        # podman's working directory, inherited by conmon, which drops an
        # empty file "oom" there when a container runs out of memory: not
        # the application's directory.
        self._cwd = os.path.join(state_dir, "podman")
        os.makedirs(self._cwd, mode=0o700, exist_ok=True)
        super().open(state_dir, log_dir, log_path)
        # _states: container name -> its inspected state (a dict) or _GONE
        # Guards _doomed: ids of containers to remove, queued under the
        # manager's lock (unwatch) and removed by the reaper's wait, which
        # holds no lock.
        self._doomed_lock = threading.Lock()
        self._doomed = []
        self._found = None      # at startup: name -> inspected container (see _scan)
        self._claimed = set()           # names of _found that recovery adopted

    # -- the podman command line ----------------------------------------------

    def _run(self, args, **streams):
        """Run ``podman <args>`` and return the CompletedProcess (text;
        stdout and stderr captured unless *streams* say otherwise); raise
        BackendUnavailable if podman is missing or hangs."""
        argv = [self.podman, "--log-level=error"]
        if self.runtime:
            argv += ["--runtime", self.runtime]
        self.calls[args[0]] += 1
        streams = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **streams}
        try:
            out = subprocess.run(argv + args, stdin=subprocess.DEVNULL, text=True,
                                 timeout=self.COMMAND_TIMEOUT, cwd=self._cwd,
                                 start_new_session=True, **streams)
        except FileNotFoundError:
            raise BackendUnavailable("podman is not installed (no %r on PATH)"
                                     % self.podman) from None
        except subprocess.TimeoutExpired:
            raise BackendUnavailable("podman %s did not answer within %g s"
                                     % (args[0], self.COMMAND_TIMEOUT)) from None
        return out

    def _name(self, job):
        return "pman-%s-%s" % (self.tag, job.jid)

    def _inspect(self, names):
        """{name: state dict, or _GONE if podman says there is no such
        container} for *names*, in one call.  A name podman says nothing
        about is left out; BackendUnavailable if it said nothing at all."""
        found = {}
        if not names:
            return found
        out = self._run(["container", "inspect", "--format", self._FORMAT] + list(names))
        for line in out.stdout.splitlines():
            try:
                item = json.loads(line)
                found[item["name"]] = dict(item["state"], labels=item["labels"] or {},
                                           id=item["id"])
            except (ValueError, KeyError, TypeError):
                continue
        if out.returncode != 0:
            missing = set(re.findall(r"no such container (\S+)", out.stderr))
            found.update((n, _GONE) for n in names if n not in found and n in missing)
            if not found:
                raise BackendUnavailable("podman container inspect: %s"
                                         % _podman_error(out))
        return found

    # -- admitting and starting a job ------------------------------------------

    def admit(self, cmd, env, extras):
        if shutil.which(self.podman) is None:
            raise BackendUnavailable("podman is not installed (no %r on PATH): the podman "
                                     "backend cannot run containers" % self.podman)
        spec = _ContainerSpec(cmd, env, extras, self.storebase)
        image, indir = spec.image, extras.get("input_dir")
        if indir is not None and not os.path.isdir(spec.indir):
            raise InvalidArgument("input_dir %s is not a directory under the storebase"
                                  % _shown(indir))
        out = self._run(["image", "exists", image])
        if out.returncode == 1:
            raise InvalidArgument("image %s is not in podman's local storage, and pman "
                                  "never pulls (podman pull it first)" % _shown(image))
        if out.returncode != 0:
            raise BackendUnavailable("podman image exists: %s" % _podman_error(out))

    # -- the seam ---------------------------------------------------------------

    def start(self, job, env):
        extras = job.extras or {}
        spec = _ContainerSpec(job.cmd if job.argv is None else job.argv, job.env, extras,
                              self.storebase)
        if extras.get("input_dir") is not None and not os.path.isdir(spec.indir):
            raise FileNotFoundError(errno.ENOENT, "no such directory (input_dir)", spec.indir)
        if spec.outdir is not None:
            os.makedirs(spec.outdir, exist_ok=True)
        name = self._name(job)
        args = ["run", "-d", "--name", name, "--pull=never", "--log-driver=passthrough",
                "--label", "pman.state=" + self.tag, "--label", "pman.jid=" + job.jid,
                "--label", "pman.seq=%d" % job.seq] + spec.options
        assigned = job.assigned or {}
        if assigned.get("cpus"):
            args.append("--cpuset-cpus=" + ",".join(map(str, assigned["cpus"])))
        for gpu in assigned.get("gpus", ()):   # CDI names of NVIDIA's container toolkit
            args += ["--device", "nvidia.com/gpu=" + gpu]
        if job.cwd is not None:
            args.append("--workdir=" + job.cwd)
        env_file = self._env_file(job, job.env, "\n") if job.env else None
        if env_file is not None:
            args.append("--env-file=" + env_file)
        args += self.podman_args + [spec.image] + spec.command
        try:
            self._create(job, name, args)
        finally:
            if env_file is not None:
                os.unlink(env_file)
        self._interval = self.MIN_POLL
        return _Seen(RUNNING, "running in container %s (image %s)" % (name, spec.image),
                     backend_id=name)

    def _create(self, job, name, args):
        """``podman run`` *args*.  Should podman refuse the name, the
        container holding it is adopted if it is this very run's (made by
        the podman run of a manager that died), or removed and the run tried
        once more if it is an earlier run's of this jid (its outcome is
        recorded, or the jid could not run again).  Raises as `_refuse`
        says."""
        for retry in (True, False):
            out = self._podman_run(job, name, args)
            if out is None:
                return
            if not retry or "already in use" not in out.stderr:
                self._refuse(name, out)
            found = self._inspect([name]).get(name)
            if found is not None and found is not _GONE:
                if found["labels"].get("pman.state") != self.tag:
                    self._refuse(name, out)
                if found["labels"].get("pman.seq") == str(job.seq):
                    return
                self._run(["rm", "-f", "-i", name])

    def _podman_run(self, job, name, args):
        """``podman run -d`` with the container's stdout and stderr on the
        job's log files (passthrough: podman itself prints nothing there
        but its errors).  None once the container runs, else the result
        with podman's error message in ``.stderr``."""
        paths = [self.log_path(job.jid, s) for s in ("stdout", "stderr")]
        fds = []
        try:
            # O_APPEND: should a container write to a file opened again
            # (and truncated) by a later start, it writes at the end, not
            # past a hole.
            fds = [_open_log(p, os.O_APPEND) for p in paths]
            try:
                out = self._run(args, stdout=fds[0], stderr=fds[1])
            except BackendUnavailable:      # it hung: make sure nothing runs unrecorded
                self._run(["rm", "-f", "-i", name])
                raise
        finally:
            for fd in fds:
                os.close(fd)
        if out.returncode == 0:
            return None
        with open(paths[1], encoding="utf-8", errors="replace") as f:
            out.stderr = f.read()[-4000:]
        if "already in use" not in out.stderr:    # else they may be another run's
            for path in paths:
                os.unlink(path)
        return out

    def _refuse(self, name, out):
        """Turn podman run's failure into the manager's words: a container
        that could not start (no such executable...) is an OSError (the
        job ends "spawn failed"); a setting of this machine that stops
        every container, BackendUnavailable (503); anything else podman
        refused (no such image, a bad mount), SubmitRejected (400)."""
        message = _podman_error(out)
        if "already in use" not in out.stderr:
            self._run(["rm", "-f", "-i", name])  # created, never started
        if "rlimit" in message or "cgroup" in message:
            raise BackendUnavailable("podman cannot start containers here: %s (see "
                                     "--podman-runtime and --podman-args)" % message)
        if out.returncode in (126, 127):
            raise OSError(errno.ENOENT if out.returncode == 127 else errno.EACCES,
                          "podman run: " + message)
        raise SubmitRejected("podman run: " + message)

    def seq_floor(self):
        try:
            found = self._scan()
        except BackendUnavailable as e:
            log.warning("cannot list this manager's containers now: %s", e)
            return 1
        seqs = [int(c["labels"].get("pman.seq", "0")) for c in found.values()
                if c is not _GONE and c["labels"].get("pman.seq", "").isdigit()]
        return max(seqs, default=0) + 1

    def unwatch(self, job):
        self._watched.pop(job.jid, None)
        if job.backend_id:
            state = self._states.pop(job.backend_id, None)
            if state is not None and state is not _GONE:
                self._doom(state)

    def _doom(self, state):
        """Have the reaper remove the container whose *state* was
        inspected: its outcome is recorded.  By id, never by name: a re-run
        of the jid may have taken the name by the time it is removed."""
        with self._doomed_lock:
            self._doomed.append(state["id"])
        self.wake()

    def _remove_doomed(self):
        with self._doomed_lock:
            ids, self._doomed = self._doomed, []
        if not ids:
            return
        try:
            out = self._run(["rm", "-f", "-i"] + ids)
        except BackendUnavailable as e:
            log.warning("cannot remove %d containers now (will retry): %s", len(ids), e)
            with self._doomed_lock:
                self._doomed.extend(ids)
            return
        if out.returncode != 0:
            log.warning("podman rm: %s", _podman_error(out))

    def _scan(self):
        """Every container of this manager (label pman.state), inspected
        once at startup: what recovery reads, instead of one podman call
        per job."""
        if self._found is None:
            out = self._run(["ps", "-a", "--filter", "label=pman.state=" + self.tag,
                             "--format", "{{.Names}}"])
            if out.returncode != 0:
                raise BackendUnavailable("podman ps: %s" % _podman_error(out))
            self._found = self._inspect(out.stdout.split())
        return self._found

    def wait(self, timeout):
        self._remove_doomed()
        self._settle_unclaimed()
        jobs = self._due_jobs(timeout)
        if jobs is None:
            return []
        names = [j.backend_id for j in jobs if j.backend_id]
        try:
            states = self._inspect(names)
        except BackendUnavailable as e:
            return self._poll_failed("podman", e)

        def key(state):
            return state if state is None or state is _GONE else (
                state["Status"], state["ExitCode"])
        changed = [j for j in jobs if j.backend_id in states and
                   key(states[j.backend_id]) != key(self._states.get(j.backend_id))]
        self._states.update(states)
        return self._polled(changed)

    def _settle_unclaimed(self):
        """Once recovery is over: remove the ended containers of this
        manager that no job claimed (their outcome was recorded before a
        crash kept them from being removed); name any still running."""
        if self._found is None:
            return
        found, self._found = self._found, {}
        for name, state in found.items():
            if state is _GONE or name in self._claimed:
                continue
            if state["Status"] in _PODMAN_RUNNING:
                log.warning("container %s runs, and no job of this manager claims it: "
                            "left alone", name)
            else:
                self._doom(state)

    def check(self, job):
        state = self._states.get(job.backend_id)
        if state is None:
            return None
        if state is _GONE:
            return _Seen(ENDED, "container %s is gone (removed outside pman?): its exit "
                         "code is unknown" % job.backend_id, None, UNDEFINED)
        status = state["Status"]
        if status in _PODMAN_RUNNING:
            if job.status == STARTED:
                return None
            return _Seen(RUNNING, "running in container %s" % job.backend_id)
        if status in _PODMAN_ENDED:
            return self._ended(job, state)
        if status == "dead":
            return _Seen(ENDED, "container %s is dead: %s" % (
                job.backend_id, state.get("Error") or "podman gives no reason"), None, ERROR)
        return None     # created, removing...: the next poll tells

    def _ended(self, job, state):
        """The _Seen of an ended container: its own exit code, worded."""
        code, limit = state["ExitCode"], (job.extras or {}).get("memory_limit")
        if job.kill_signal and job.kill_sent:   # pman's kill: -N, and what it did
            return _Seen(ENDED, "the container exited %d" % code, code, ERROR)
        if code == 0:
            return _Seen(ENDED, "exited with code 0", 0, SUCCESS)
        if state.get("OOMKilled") or (code == 128 + signal.SIGKILL and limit):
            return _Seen(ENDED, "killed by SIGKILL, %s (limit %g MiB); the container "
                         "exited %d" % ("out of memory" if state.get("OOMKilled")
                                        else "likely out of memory", limit or 0, code),
                         code, ERROR)
        status, code, message = _exit_status(code)
        return _Seen(ENDED, message, code, status)

    def signal(self, job, sig):
        if not job.backend_id:
            return False
        out = self._run(["kill", "--signal", str(int(sig)), job.backend_id])
        if out.returncode != 0:
            if ("no such container" in out.stderr
                    or "can only kill running containers" in out.stderr):
                return False
            raise BackendUnavailable("podman kill: %s" % _podman_error(out))
        self._interval = self.MIN_POLL      # confirm the outcome from podman, soon
        self.wake()
        return True

    def recover_queued(self, job):
        # No container unless a write was lost (power loss): look anyway.
        return self._find(job)

    def recover(self, job):
        if not job.backend_id:      # handed over: was the container made?
            return self._find(job)
        state = self._scan().get(job.backend_id)
        if state is None or state is _GONE:
            return _Seen(ENDED, "container %s is gone (removed while no manager ran?): its "
                         "exit code is unknown" % job.backend_id, None, UNDEFINED)
        self._claimed.add(job.backend_id)
        return self._settle(job, job.backend_id, state)

    def _find(self, job):
        """A job whose start was never confirmed on disk: its container,
        made by this run (label pman.seq) before the manager died, is
        adopted or settled, so that it never runs twice; NEVER if there is
        none and the job may be started."""
        name = self._name(job)
        state = self._scan().get(name)
        if (state is None or state is _GONE
                or state["labels"].get("pman.seq") != str(job.seq)):
            if job.ident is not None and job.ident[1] != _BOOT_ID:
                return _Seen(ENDED)     # handed over before a reboot: it may have run
            return _Seen(NEVER)
        self._claimed.add(name)
        if state["Status"] not in _PODMAN_RUNNING | _PODMAN_ENDED:
            # Created but never started: remove it (not -f: should it start
            # meanwhile, the removal fails and the poll sees it run).
            if self._run(["rm", name]).returncode == 0:
                return _Seen(NEVER)
            return _Seen(QUEUED, backend_id=name)
        return self._settle(job, name, state)

    def _settle(self, job, name, state):
        """What recovery found of container *name*: it runs (re-adopted),
        or it ended."""
        if state["Status"] in _PODMAN_RUNNING:
            return _Seen(RUNNING, None if job.status == STARTED else
                         "running in container %s, found after a restart" % name,
                         backend_id=name)
        self._doom(state)
        if state["Status"] in _PODMAN_ENDED:
            return self._ended(job, state)._replace(backend_id=name)
        return _Seen(ENDED, "container %s is %s" % (name, state["Status"]), None, UNDEFINED,
                     backend_id=name)

    def close(self):
        self._remove_doomed()
        super().close()


def _podman_error(out):
    """podman's own message: its last "Error: ..." line, else the last line."""
    lines = [l.strip() for l in (out.stderr or "").splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith(("Error:", "error"))]
    text = (errors or lines or ["exit status %d" % out.returncode])[-1]
    return text[len("Error: "):] if text.startswith("Error: ") else text


def _make_backend(backend):
    """A backend object for ``JobManager(backend=...)``: a name, or any
    object that implements the `_Backend` protocol."""
    if backend is None or backend == "local":
        return LocalBackend()
    if backend == "slurm":
        return SlurmBackend()
    if backend == "podman":
        return PodmanBackend()
    if isinstance(backend, str):
        raise InvalidArgument("unknown backend %r: 'local', 'slurm', 'podman' or a backend "
                              "object" % backend)
    missing = [m for m in _BACKEND_METHODS if not callable(getattr(backend, m, None))]
    if missing:
        raise InvalidArgument("backend %r lacks %s: a backend implements the methods "
                              "of pman._Backend" % (backend, ", ".join(missing)))
    return backend


# ---------------------------------------------------------------------------
# JobManager's parts
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


class _Retention:
    """Which finished jobs go first when jobs are forgotten
    (``keep_finished``, ``forget(keep=)``): those that ended first, not those
    submitted first, so a job that just ended is never the next forgotten.
    Holds (jid, line) pairs in order of ending; a pair whose line is no
    longer the job's record (re-run, forgotten, replaced by `reload`) is
    stale and skipped.  Guarded by the manager's lock."""

    def __init__(self, pairs):
        self._order = collections.deque(pairs)
        self.count = len(self._order)       # finished jobs held now

    def ended(self, jid, line, jobs):
        self.count += 1
        self._order.append((jid, line))
        if len(self._order) > 2 * self.count + 1000:      # drop stale pairs
            self._order = collections.deque(p for p in self._order if jobs.get(p[0]) is p[1])

    def oldest(self, n, jobs):
        """Remove and return the jids of the *n* jobs that ended first."""
        doomed = []
        while self._order and len(doomed) < n:
            jid, line = self._order.popleft()
            if jobs.get(jid) is line:       # else re-run or forgotten since
                doomed.append(jid)
        return doomed

    def put_back(self, pairs):
        """Return (jid, line) *pairs* taken by `oldest` to the front."""
        self._order.extendleft(reversed(pairs))

    def relined(self, replaced, jobs):
        """Jobs whose finished line `reload` replaced (jid -> old line)."""
        self._order = collections.deque(
            (jid, jobs[jid] if replaced.get(jid) is line else line) for jid, line in self._order)


class _Timers:
    """The manager's timers (a timeout, a kill's escalation, a re-send, a
    log check), in a heap of (when, n, kind, jid, seq).  Each belongs to one
    run of a job (*seq*), so a re-run of its jid is never touched by the
    timers of an earlier run.  The timers of a job that ends are cancelled:
    the heap drops them once they are a quarter of it (and at least 64), so
    dead timers never pile up.  Guarded by the manager's lock."""

    def __init__(self):
        self._heap = []
        self._n = 0
        self._dead = 0          # entries of jobs that have ended

    def __len__(self):
        return len(self._heap)

    def push(self, delay, kind, job):
        self._n += 1
        heapq.heappush(self._heap, (_time() + delay, self._n, kind, job.jid, job.seq))
        job.timers += 1

    def next_due(self):
        """When the next timer is due (monotonic), or None."""
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now, live):
        """Remove the timers due by *now* and yield (kind, job) for those
        whose job ``live(jid, seq)`` returns."""
        while self._heap and self._heap[0][0] <= now:
            _, _, kind, jid, seq = heapq.heappop(self._heap)
            job = live(jid, seq)
            if job is None:
                self._dead = max(0, self._dead - 1)
                continue
            job.timers -= 1
            yield kind, job

    def cancel(self, job, live):
        """*job* has ended: its timers are dead."""
        self._dead += job.timers
        job.timers = 0
        if self._dead >= 64 and 4 * self._dead >= len(self._heap):
            self._heap = [t for t in self._heap if live(t[3], t[4]) is not None]
            heapq.heapify(self._heap)
            self._dead = 0


def _registry_release(manager, every_handle=False):
    """Drop one handle of *manager* (every one with *every_handle*); True
    if that was the last and the caller must shut the manager down."""
    with _registry_lock:
        if manager._options is None:        # already closed
            return False
        manager._refs = 0 if every_handle else manager._refs - 1
        if manager._refs > 0:
            return False
        manager._options = None
        _registry.pop(manager._path, None)
        return True


def _take_dir_lock(path):
    """flock() the state directory *path* for this process and write its
    pid into the lock file; return the fd, held until the manager closes.
    StateLocked if another live process holds it."""
    lock_path = os.path.join(path, "lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
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
            raise StateLocked(path, holder)
        threading.Event().wait(0.02)
    os.ftruncate(fd, 0)
    os.pwrite(fd, b"%d\n" % os.getpid(), 0)
    return fd


class _JobLogs:
    """The jobs' output files in *log_dir*: ``<jid>.out`` and ``<jid>.err``,
    and, while a re-run of a jid is submitted, the earlier run's kept aside
    as ``<jid>.out~`` and ``<jid>.err~`` (no jid contains "~").  Holds no
    job state: the manager decides when a job's logs are read, moved or
    deleted."""

    def __init__(self, log_dir):
        self.dir = log_dir
        self._prefix = os.path.join(log_dir, "")

    def path(self, jid, stream):
        # A jid holds no "/" (JID_RE): a concatenation names the file.
        return self._prefix + jid + (".out" if stream == "stdout" else ".err")

    def move(self, jid, mark, new_mark):
        """Rename the logs of *jid* marked *mark* ("" or "~") to
        *new_mark*, or delete them (None)."""
        for suffix in (".out", ".err"):
            old = os.path.join(self.dir, jid + suffix + mark)
            try:
                if new_mark is None:
                    os.unlink(old)
                else:
                    os.replace(old, os.path.join(self.dir, jid + suffix + new_mark))
            except FileNotFoundError:
                pass

    def read(self, jid, stream, offset, limit):
        """(the bytes of *stream* from *offset*, at most *limit*; whether
        more follow them)."""
        try:
            with open(self.path(jid, stream), "rb") as f:
                left = os.fstat(f.fileno()).st_size - offset
                if left > 0:    # never seek past the end: 2**44 is EINVAL on ext4
                    f.seek(offset)
                    data = f.read(left if limit is None else min(limit, left))
                    return data, bool(f.read(1))
        except FileNotFoundError:
            pass
        return b"", False

    def tail(self, jid, stream):
        """The end of *stream* ("stdout", "stderr", or None for both, in
        order) as text: at most TAIL_LINES lines and TAIL_BYTES bytes."""
        parts = []
        for name in ((stream,) if stream else ("stdout", "stderr")):
            try:        # a log still empty (most, on a job's start) is not opened
                path = self.path(jid, name)
                if os.stat(path).st_size:
                    with open(path, "rb") as f:
                        size = f.seek(0, os.SEEK_END)
                        f.seek(max(0, size - TAIL_BYTES))
                        parts.append(f.read())
            except OSError:
                pass
        text = b"".join(parts)[-TAIL_BYTES:].decode("utf-8", "replace")
        # The text after a final newline is not a line: keep 1,000 before it.
        keep = TAIL_LINES + 1 if text.endswith("\n") else TAIL_LINES
        return "\n".join(text.split("\n")[-keep:])

    def over_limit(self, jid, limit):
        """The first stream of *jid* grown past *limit* bytes, or None."""
        for stream in ("stdout", "stderr"):
            try:
                size = os.stat(self.path(jid, stream)).st_size
            except OSError:
                continue
            if size > limit:
                return stream
        return None


class _Feed:
    """The change feed behind `JobManager.changes`: each change of a job's
    record gets the next sequence number, and the latest CHANGES_KEPT
    (seq, jid) pairs are kept.  Each opening numbers from the clock's
    microseconds, so a cursor handed out by an earlier run is always behind
    this one's and gets reset.  Guarded by the manager's lock, *lock*."""

    def __init__(self, lock):
        self._ring = collections.deque(maxlen=CHANGES_KEPT)
        self.seq = int(_wall() * 1e6)
        self.moved = threading.Condition(lock)
        self.listeners = []     # callables run (under the lock) when it moves: must not block
        self._counts = (None, None)     # (seq, counts()) as of that seq

    def note(self, jid):
        """*jid*'s record changed: number the change, wake the waiters."""
        self.seq += 1
        self._ring.append((self.seq, jid))
        self.moved.notify_all()
        for wake in self.listeners:
            wake()

    def wait(self, since, timeout, closing):
        """Wait while nothing came after *since*, for at most *timeout* s
        (None: no limit), or until ``closing()``."""
        self.moved.wait_for(lambda: since != self.seq or closing(), timeout)

    def after(self, since, limit):
        """(head, reset, picked) for `JobManager.changes`: *picked* lists
        (jid, seq) of each jid changed after *since* at its latest change,
        oldest first, at most *limit*; *head* is the last one's seq if the
        limit cut the list, else the latest."""
        head = self.seq
        since = head if since is None else since
        oldest = self._ring[0][0] if self._ring else head + 1
        reset = since > head or since < oldest - 1
        latest = {}             # jid -> its latest seq after since
        if not reset:
            for seq, jid in reversed(self._ring):
                if seq <= since:
                    break
                latest.setdefault(jid, seq)
        picked = sorted(latest.items(), key=lambda item: item[1])[:limit]
        if limit is not None and len(latest) > limit:
            head = picked[-1][1]
        return head, reset, picked

    def counts_at(self, seq):
        """The counts kept for *seq*, or None if they must be counted."""
        counted_at, counts = self._counts
        return counts if counted_at == seq else None

    def keep_counts(self, seq, counts):
        if (self._counts[0] or 0) < seq:
            self._counts = seq, counts


def _count_statuses(entries):
    """``{status: n}`` of *entries*: finished jobs' lines, and the statuses
    of active ones."""
    counts = dict.fromkeys(STATUSES, 0)
    for entry in entries:
        counts[_LINE_RE.match(entry).group(2) if entry[0] == "{" else entry] += 1
    return counts


class _Metrics:
    """The counters of `JobManager.stats`, since the manager opened: jobs
    started, spawns failed, endings by status, and the reaper's lag
    histogram.  Guarded by the manager's lock."""

    def __init__(self):
        self.tally = collections.Counter()  # "started", "spawn failed", statuses
        self.cpu = {"user": 0.0, "system": 0.0}     # CPU seconds of the jobs ended
        self._tallied = set()               # active jids counted as started
        self.lag = [0] * (len(LAG_BUCKETS) + 1) + [0.0]   # bucket counts, +Inf, sum

    def restart(self, running):
        """Recovery is not news: count from here, the *running* jobs (jid
        -> _Job) as started already."""
        self.tally.clear()
        self.cpu = dict.fromkeys(self.cpu, 0.0)
        self._tallied = {jid for jid, job in running.items() if job.status == STARTED}

    def changed(self, jid, status, ended=None):
        """Count a change of *jid* to *status* (*ended*: the _Job whose
        ending was recorded)."""
        if status == STARTED and jid not in self._tallied:
            self._tallied.add(jid)
            self.tally["started"] += 1
        elif status not in ACTIVE:
            if ended is not None:
                if ended.started is not None and jid not in self._tallied:
                    self.tally["started"] += 1     # it ran between two SLURM polls
                self.tally[status] += 1
                for mode in self.cpu:
                    self.cpu[mode] += (ended.usage or {}).get("cpu_" + mode) or 0.0
            self._tallied.discard(jid)

    def observe_lag(self, seconds):
        """Count one ending in the lag histogram: the time from the
        reaper's wake-up for the job's exit to the job's record."""
        self.lag[bisect.bisect_left(LAG_BUCKETS, seconds)] += 1
        self.lag[-1] += seconds



class _JobFilter:
    """The filters of `JobManager.jobs`, checked once, then applied to
    stored lines outside the manager's lock."""

    def __init__(self, status=None, auid=None, meta=None, text=None):
        if isinstance(status, str):
            status = (status,)
        if status is not None:
            named = []
            for s in status:
                named.append(STATUS_ALIASES.get(s.lower()) if isinstance(s, str) else None)
                if named[-1] is None:
                    raise InvalidArgument("unknown status %s: one of %s, or queued (waiting), "
                                          "running, succeeded (success, ok), failed"
                                          % (_shown(s), ", ".join(STATUSES)))
            status = tuple(named)
        if meta is not None and not isinstance(meta, dict):
            raise InvalidArgument("meta filter must be a dict")
        if text is not None and not isinstance(text, str):
            raise InvalidArgument("text filter must be a string")
        self.status, self.auid, self.meta = status, auid, meta
        self.needle = text.lower() if text else None

    def match(self, line):
        """The record of *line* if it passes every filter, else None."""
        if self.status is not None and _line_status(line) not in self.status:
            return None
        record = json.loads(line)
        if self.auid is not None and record["auid"] != self.auid:
            return None
        if self.needle is not None and not any(self.needle in (record[k] or "").lower()
                                               for k in ("jid", "cmd", "auid", "message")):
            return None
        if self.meta and any(record["meta"].get(k, _MISSING) != v
                             for k, v in self.meta.items()):
            return None
        return record


# What a reaper's turn decided under the lock (JobManager._reap_locked), for
# the rest of the turn to act on without it: the _Kills to deliver, the
# handed-over jobs to start, how many finished jobs to forget, whether the
# journal is due a sync and the backend had nothing running, and on_end's
# records.
_Turn = collections.namedtuple("_Turn", "kills starting doomed flush idle ended")


# ---------------------------------------------------------------------------
# The scheduler
# ---------------------------------------------------------------------------

GROUPS_FILE = "groups.json"
_MISSING = object()


def _memory_capacity():
    """MiB this process may use: the machine's memory, or its memory
    cgroup's limit where that is smaller."""
    total = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) // 1024
    except (OSError, ValueError):
        pass
    where, _ = _memory_cgroup()
    for name in ("memory.limit_in_bytes", "memory.max"):
        try:
            with open(os.path.join(where or "/nonexistent", name)) as f:
                limit = int(f.read()) // 1048576
        except (OSError, ValueError):       # none, or "max"
            continue
        total = limit if total is None else min(total, limit)
    return total or 0


def _gpu_inventory():
    """The GPU ids this process can see: CUDA_VISIBLE_DEVICES when set,
    else what `nvidia-smi -L` lists, else none."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=10,
                             universal_newlines=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return re.findall(r"^GPU (\d+):", out, re.M)


def _plural(n, word):
    return "%d %s%s" % (n, word, "" if n == 1 else "s")


class _Capacity:
    """What jobs' requests are admitted against: CPUs (core ids), memory
    (MiB) and GPUs (ids), and which of them running jobs hold.  Guarded by
    the manager's lock."""

    def __init__(self, cpus=None, memory=None, gpus=None):
        affinity = sorted(os.sched_getaffinity(0))
        if cpus is None:
            cores = affinity
        elif isinstance(cpus, int) and not isinstance(cpus, bool):
            if not 1 <= cpus <= len(affinity):
                raise InvalidArgument("cpus must be from 1 to %d (this process may use CPUs "
                                      "%s), not %d" % (len(affinity), affinity, cpus))
            cores = affinity[:cpus]
        elif isinstance(cpus, (list, tuple)) and cpus and all(
                isinstance(c, int) and not isinstance(c, bool) and c in affinity for c in cpus):
            cores = sorted(set(cpus))
        else:
            raise InvalidArgument("cpus must be a number of CPUs or a list of core ids of "
                                  "this process's %s, not %s" % (affinity, _shown(cpus)))
        if memory is None:
            memory = _memory_capacity()
        elif isinstance(memory, bool) or not isinstance(memory, int) or memory < 1:
            raise InvalidArgument("memory must be a positive number of MiB, not %s"
                                  % _shown(memory))
        if gpus is None:
            gpus = _gpu_inventory()
        elif not isinstance(gpus, (list, tuple)) or not all(
                isinstance(g, (str, int)) and not isinstance(g, bool) and str(g).strip()
                for g in gpus) or len(set(map(str, gpus))) != len(gpus):
            raise InvalidArgument("gpus must be a list of distinct GPU ids, not %s"
                                  % _shown(gpus))
        self.cpus, self.memory, self.gpus = cores, memory, [str(g) for g in gpus]
        self.used_cpus, self.used_gpus, self.used_memory = set(), set(), 0

    def __str__(self):
        return "%s (%s), %d MiB of memory, %s" % (
            _plural(len(self.cpus), "CPU"), ",".join(map(str, self.cpus)), self.memory,
            "GPUs %s" % ",".join(self.gpus) if self.gpus else "no GPUs")

    def free(self):
        return (len(self.cpus) - len(self.used_cpus), self.memory - self.used_memory,
                len(self.gpus) - len(self.used_gpus))

    def never_fits(self, shape):
        """Why a request of *shape* (cpus, memory, gpus) can never start
        here, or None."""
        over = [("%s=%d (or pfcon's %s)" % (name, need, pfcon))
                for need, have, name, pfcon in zip(
                    shape, (len(self.cpus), self.memory, len(self.gpus)),
                    ("cpus", "memory", "gpus"), ("cpu_limit", "memory_limit", "gpu_limit"))
                if need > have]
        if over:
            return "%s is more than the manager has: %s" % (" and ".join(over), self)
        return None

    def short_of(self, shape):
        """What a request of *shape* lacks now ("needs 2 GPUs, 1 free"), or
        None if it fits."""
        for need, have, what in zip(shape, self.free(), ("CPU", "MiB", "GPU")):
            if need > have:
                return "needs %s, %d free" % (
                    "%d MiB of memory" % need if what == "MiB" else _plural(need, what), have)
        return None

    def assign(self, shape):
        """The cores and GPUs of its own for a request of *shape* that fits:
        ``{"cpus": [ids], "gpus": [ids], "memory": MiB}``."""
        cores = [c for c in self.cpus if c not in self.used_cpus][:shape[0]]
        gpus = [g for g in self.gpus if g not in self.used_gpus][:shape[2]]
        return {"cpus": cores, "gpus": gpus, "memory": shape[1]}

    def take(self, assigned):
        """A running job holds *assigned* (those of its cores and GPUs that
        this capacity has: a restart may have given it fewer)."""
        if assigned:
            self.used_cpus.update(set(assigned.get("cpus", ())) & set(self.cpus))
            self.used_gpus.update(set(assigned.get("gpus", ())) & set(self.gpus))
            self.used_memory += assigned.get("memory", 0)

    def give_back(self, assigned):
        if assigned:
            self.used_cpus.difference_update(assigned.get("cpus", ()))
            self.used_gpus.difference_update(assigned.get("gpus", ()))
            self.used_memory -= assigned.get("memory", 0)


class _Running(dict):
    """The manager's jid -> handed-over or running _Job, counting them by
    group and holding their assigned resources for the scheduler as they
    come and go."""

    def __init__(self, sched):
        super().__init__()
        self.by_group, self.capacity = sched.running, sched.capacity

    def __setitem__(self, jid, job):
        self.pop(jid, None)
        dict.__setitem__(self, jid, job)
        self.by_group[job.get("group")] += 1
        self.capacity.take(job.assigned)

    def pop(self, jid, default=_MISSING):
        if jid in self:
            job = dict.pop(self, jid)
            self.by_group[job.get("group")] -= 1
            self.capacity.give_back(job.assigned)
            return job
        if default is _MISSING:
            raise KeyError(jid)
        return default


def _clock(epoch):
    """*epoch* as a person reads it in a reason: the time of day, with the
    date when it is not within a day."""
    fmt = "%H:%M:%S" if abs(epoch - _wall()) < 86400 else "%Y-%m-%d %H:%M:%S"
    try:
        return datetime.fromtimestamp(epoch).strftime(fmt)
    except (OverflowError, ValueError, OSError):    # past 9999 in local time
        return datetime.fromtimestamp(epoch, timezone.utc).strftime(fmt + " UTC")


def _find_cycle(edges):
    """A cycle of the graph *edges* (node -> [nodes it waits for]) as a list
    of nodes whose last is its first, or None.  Iterative."""
    state = {}                          # node -> 1 on the path, 2 done
    for root in edges:
        if state.get(root):
            continue
        path, stack = [], [(root, iter(edges[root]))]
        state[root] = 1
        path.append(root)
        while stack:
            node, children = stack[-1]
            for child in children:
                if state.get(child) == 1:
                    return path[path.index(child):] + [child]
                if not state.get(child) and child in edges:
                    state[child] = 1
                    path.append(child)
                    stack.append((child, iter(edges[child])))
                    break
            else:
                stack.pop()
                path.pop()
                state[node] = 2
    return None


def _dependency_end_text(record):
    """How a finished dependency ended, for its dependents' messages."""
    code = record["returncode"]
    if record["status"] == UNDEFINED:
        return "ended undefined"
    if code is None:    # a cascade names only the next link, not the whole chain
        return ("was not started" if record["message"].startswith("not started: ")
                else "never ran (%s)" % record["message"])
    if code < 0:
        try:
            return "was killed by %s" % signal.Signals(-code).name
        except ValueError:
            return "was killed by signal %d" % -code
    return "finished with error (exit %d)" % code


def _dependency_verdict(jid, entry, any_end):
    """What the end of dependency *jid* (its stored *entry*, None if it is
    no longer known) means for a job waiting on it: None while it is
    active, True once it counts, else the message the dependent ends with."""
    if entry is not None and not _is_finished(entry):
        return None
    if entry is not None and (any_end or _line_status(entry) == SUCCESS):
        return True
    how = "is no longer known" if entry is None else _dependency_end_text(json.loads(entry))
    return "not started: dependency %s %s" % (jid, how)


class _Scheduler:
    """What may start now, and why each other queued job waits.

    A queued job waits for its own conditions (its dependencies, `pending`;
    a release, `hold`; a time, `begin` or `retry_at`), then for its group
    and the manager to be neither paused nor full.  Its own conditions are
    settled as their events come: a dependency's end (`dependents`), a time
    (the timed heap), a release.  A job free of them sits in its group's
    heap, highest priority then oldest (lowest seq) first, so that picking
    the next job costs one heap look per group and no event scans the
    waiting jobs.  Heap entries are dropped lazily: an entry counts only
    while it is its job's `queued`.  Group limits and pauses are kept in
    GROUPS_FILE.  Guarded by the manager's lock."""

    def __init__(self, path, max_running, entries, capacity, local):
        self.path = os.path.join(path, GROUPS_FILE)
        self.max_running = max_running
        self.capacity = capacity
        self.local = local          # requests are admitted here (not SLURM's)
        self.entries = entries                  # the manager's jid -> entry
        self.queue = {}                         # jid -> queued _Job
        self.running = collections.Counter()    # group -> handed-over jobs
        self.paused = False
        self.limits = {}                        # group -> max_running (None: none)
        self.paused_groups = set()
        self._ready = {}            # (group, shape) -> heap [-priority, seq, n, job]
        self._timed = []                        # heap [epoch, seq, n, job]
        self._after = {}                        # jid -> [jobs with it in `pending`]
        self._n = 0
        self._load()

    # -- queued jobs -------------------------------------------------------------

    def add(self, job):
        """*job* waits from now on (a submission, a retry, a recovery)."""
        job.sched = self
        self.queue[job.jid] = job
        for jid, _ in job.pending or ():
            self._after.setdefault(jid, []).append(job)
        self.place(job)

    def discard(self, job):
        """*job* no longer waits (it was handed over, or it ended)."""
        if job.sched is self:
            job.sched = job.queued = None
            if self.queue.get(job.jid) is job:
                del self.queue[job.jid]

    def place(self, job):
        """Put *job* in the heap its conditions now call for (none while it
        is held or has pending dependencies)."""
        job.queued = None
        if job.hold or job.pending:
            return
        self._n += 1
        due = self._due(job)
        if due > _wall():
            job.queued = [due, job.seq, self._n, job]
            heapq.heappush(self._timed, job.queued)
        else:
            job.queued = [-job.get("priority"), job.seq, self._n, job]
            heapq.heappush(self._ready.setdefault((job.get("group"), self.shape(job)), []),
                           job.queued)

    def shape(self, job):
        """What *job* asks of this machine: (cpus, MiB, gpus)."""
        if not self.local:
            return (0, 0, 0)
        return (job.get("cpus"), job.get("memory"), job.get("gpus"))

    @staticmethod
    def _due(job):
        begin = job.begin
        return max(_parse_time(begin) if begin else 0.0, job.retry_at or 0.0)

    def dependents(self, jid):
        """The queued jobs that still have *jid* in `pending` (once)."""
        return [job for job in self._after.pop(jid, ())
                if job.sched is self and any(p[0] == jid for p in job.pending or ())]

    def resolve(self, job, jid):
        """Dependency *jid* of *job* counts now."""
        job.pending = [p for p in job.pending if p[0] != jid] or None
        if not job.pending:
            self.place(job)

    # -- time --------------------------------------------------------------------

    def next_due(self):
        """Epoch seconds of the next begin or retry time, or None."""
        while self._timed and self._timed[0] is not self._timed[0][3].queued:
            heapq.heappop(self._timed)
        return self._timed[0][0] if self._timed else None

    def wake_due(self):
        """Make the jobs whose time has come ready to start."""
        now = _wall()
        while self.next_due() is not None and self._timed[0][0] <= now:
            self.place(heapq.heappop(self._timed)[3])

    # -- picking -----------------------------------------------------------------

    def full(self, group):
        limit = self.limits.get(group)
        return limit is not None and self.running[group] >= limit

    def next(self, running):
        """The queued job to start next, removed from the queue, or None:
        of the ready jobs of groups neither paused nor full, while the
        manager (*running* jobs) is neither, the highest-priority, then
        oldest, whose request fits.  The first in that order whose request
        does not fit reserves it: a job behind it starts only within what
        remains, so that a stream of small jobs never starves a large one.
        A heap per group and request shape: its head stands for all of it."""
        if self.paused or (self.max_running is not None and running >= self.max_running):
            return None
        for entry, key, _ in self._admissible():
            if entry is not None:
                heapq.heappop(self._ready[key])
                self.discard(entry[3])
                return entry[3]
        return None

    def _admissible(self):
        """Yield, in priority order over the heads of the ready heaps of
        groups neither paused nor full, (heap entry, heap key, None) for
        each head that fits, and (None, None, job) once for the job that
        reserves (see `next`)."""
        heads = []
        for key in list(self._ready):
            heap = self._ready[key]
            while heap and heap[0] is not heap[0][3].queued:
                heapq.heappop(heap)
            if not heap:
                del self._ready[key]
            elif key[0] not in self.paused_groups and not self.full(key[0]):
                heads.append((heap[0], key))
        free, reserved = None, False
        for entry, (group, shape) in sorted(heads, key=lambda h: h[0][:3]):
            if not any(shape):          # asks for nothing: fits
                yield entry, (group, shape), None
                continue
            if free is None:
                free = self.capacity.free()
            if all(need <= have for need, have in zip(shape, free)):
                yield entry, (group, shape), None
            # A job queued under a larger capacity (before a restart) that
            # can never fit here reserves nothing: it would block every other.
            elif not reserved and not self.capacity.never_fits(shape):
                free = tuple(max(0, have - need) for need, have in zip(shape, free))
                reserved = True
                yield None, None, entry[3]

    def _reserving(self, job):
        """The queued job whose reservation holds *job* back, or None."""
        holder = None
        for entry, key, reserving in self._admissible():
            if reserving is not None:
                holder = reserving
            elif key == (job.get("group"), self.shape(job)):
                return None         # its heap's head may start now
        return holder if holder is not job else None

    # -- why a job waits ---------------------------------------------------------

    def why(self, job):
        return self.reason(job)[1]

    def reason(self, job):
        """(label, text): why queued *job* waits.  The label is one of a
        fixed set (METRIC_REASONS), the text one line for a person."""
        if job.hold:
            return "held", "held"
        if job.pending:
            jid = job.pending[0][0]
            entry = self.entries.get(jid)
            state = "gone" if entry is None else _entry_status(entry)
            more = len(job.pending) - 1
            return "after", "after %s (%s)%s" % (jid, state, " and %d more" % more
                                                 if more else "")
        due = self._due(job)
        if due > _wall():
            if job.retry_at and job.retry_at >= due:
                return "retry", "retry %d of %d at %s" % (
                    len(job.attempts or ()), job.get("retries"), _clock(due))
            return "begin", "begins %s" % _clock(due)
        group = job.get("group")
        if self.paused:
            return "paused", "paused"
        if group in self.paused_groups:
            return "paused", "group %s paused" % group
        if self.full(group):
            return "full", "group %s full (%d running)" % (group, self.running[group])
        shape = self.shape(job)
        short = self.capacity.never_fits(shape) or self.capacity.short_of(shape)
        if short:
            return "resources", short
        holder = self._reserving(job) if any(shape) else None
        if holder is not None:
            return "resources", "behind %s, which has reserved what it needs (%s)" % (
                holder.jid, self.capacity.short_of(self.shape(holder)))
        return "full", "waiting for a free slot (%d running)" % sum(self.running.values())

    # -- groups and pauses -------------------------------------------------------

    def group(self, name, waiting=None):
        """A group's state: its limit, pause, and jobs running and queued
        (*waiting*, if the caller has counted them)."""
        if waiting is None:
            waiting = sum(j.get("group") == name for j in self.queue.values())
        return {"name": name, "max_running": self.limits.get(name),
                "paused": name in self.paused_groups, "running": self.running[name],
                "waiting": waiting}

    def groups(self):
        waiting = collections.Counter(j.get("group") for j in self.queue.values())
        names = {DEFAULT_GROUP} | set(self.limits) | self.paused_groups | set(waiting) | {
            g for g, n in self.running.items() if n}
        return [self.group(name, waiting[name]) for name in sorted(names)]

    def _load(self):
        try:
            with open(self.path, encoding="utf-8") as f:
                data = _loads(f.read())
            self.paused = data["paused"]
            for name, group in data["groups"].items():
                check_group(name)
                if group.get("max_running") is not None:
                    self.limits[name] = _check_limit(group["max_running"])
                if group.get("paused"):
                    self.paused_groups.add(name)
            if not isinstance(self.paused, bool):
                raise ValueError("'paused' is not a boolean")
        except FileNotFoundError:
            return
        except (ValueError, KeyError, TypeError, AttributeError, PmanError) as e:
            aside = "%s.damaged-%d" % (self.path, int(_wall()))
            os.replace(self.path, aside)
            # What was paused is unknown: start nothing until an operator
            # has set the groups again and resumes.
            log.error("%s is damaged (%s): moved aside to %s; no group has a limit, and "
                      "the manager is paused until resume()", self.path, e, aside)
            self.paused, self.limits, self.paused_groups = True, {}, set()

    def save(self):
        """Write the groups' limits and pauses (atomically, synced)."""
        groups = {name: {"max_running": self.limits.get(name),
                         "paused": name in self.paused_groups}
                  for name in sorted(set(self.limits) | self.paused_groups)}
        _write_atomic(self.path, [json.dumps({"paused": self.paused, "groups": groups},
                                             indent=1), "\n"])


def _check_limit(max_running):
    """A group's max_running: a positive integer, or None for no limit."""
    if max_running is not None and (isinstance(max_running, bool) or not isinstance(
            max_running, int) or max_running < 1):
        raise InvalidArgument("max_running must be a positive integer or null, not %s"
                              % _shown(max_running))
    return max_running




def _how_it_ended(job, end):
    """How *job* is finished, given how the backend says it ended (a
    `_Seen` of state ENDED: the code its wrapper reported, None if none
    survives): (status, returncode, message, whether it started)."""
    code = end.code
    oom = end.oom is not None and "killed: out of memory (limit %d MiB)" % end.oom
    if job.kill_signal and job.kill_sent:
        sig = job.kill_signal
        if job.kill_reason == "on request":
            why = "killed by %s on request" % signal_name(sig)
        else:
            why = "%s (%s)" % (job.kill_reason, signal_name(sig))
        if end.message or oom:  # what the backend saw, e.g. SLURM's final state
            why += "; " + (end.message or oom)
        if job.status == NOTSTARTED:    # still in the backend's queue: cancelled
            return ERROR, None, "cancelled before it started (%s)" % why, False
        return ERROR, -sig, why, True
    if end.status is not None:
        return end.status, code, end.message, True
    # The cgroup counted a kill and the job (or the shell that ran its last
    # command, or its wrapper, which then left no code) died of a SIGKILL.
    if oom and code in (None, -signal.SIGKILL, 128 + signal.SIGKILL):
        return ERROR, -signal.SIGKILL, oom, True
    if code is None:
        status, message = (UNDEFINED, "the job ended while no manager was watching "
                           "and left no exit code")
    elif code < 0:     # the wrapper itself died of a signal pman did not send
        sig = -code
        status, code, message = _exit_status(128 + sig)
        message = "killed by %s (not sent by pman); %s" % (signal_name(sig), message)
    else:
        status, code, message = _exit_status(code)
    if oom:     # one of its processes, and the job lived on
        message += "; a process of the job was " + oom
    return status, code, message, True


# ---------------------------------------------------------------------------
# JobManager
# ---------------------------------------------------------------------------

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
      it aside;
    - ``backend``: where jobs run: ``"local"`` (the default), ``"slurm"``,
      ``"podman"``, or a `LocalBackend`, `SlurmBackend` or `PodmanBackend`;
    - ``cpus``, ``memory``, ``gpus``: the capacity that jobs' requests are
      admitted against: a number of CPUs or a list of core ids (default:
      this process's affinity), MiB (default: the machine's memory or its
      cgroup's limit, the smaller), a list of GPU ids (default: from
      ``CUDA_VISIBLE_DEVICES``, else ``nvidia-smi -L``, else none).

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
                 durable=True, strict=False, backend="local", cpus=None, memory=None,
                 gpus=None):
        options = dict(max_running=max_running, grace=grace, log_limit=log_limit,
                       keep_finished=keep_finished, env=env, on_end=on_end,
                       durable=durable, strict=strict, backend=backend, cpus=cpus,
                       memory=memory, gpus=gpus)
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
            _check_count("log_limit", log_limit)
            _check_count("keep_finished", keep_finished)
            self.max_running = max_running
            self.grace = float(grace)
            self.log_limit = log_limit
            self.keep_finished = keep_finished
            self.env = _check_env(env)
            self.on_end = on_end
            self.durable = durable
            self.backend = _make_backend(backend)
            self.capacity = _Capacity(cpus, memory, gpus)
            self.state_dir = self._path
            self.log_dir = os.path.join(self._path, "logs")
            self._logs = _JobLogs(self.log_dir)
            self._open(strict)
            self._options = options
            self._refs = 1
            _registry[self._path] = self

    # -- opening and closing -----------------------------------------------------

    def _open(self, strict):
        os.makedirs(self.log_dir, mode=0o700, exist_ok=True)
        os.chmod(self._path, 0o700)
        self._lock_fd = _take_dir_lock(self._path)
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
        """Load the state: finished jobs stay lines, the active ones become
        _Jobs, re-adopted or settled (see `_recover`).  Send the kills they
        still owe, start queued jobs, fold replayed journals into a fresh
        snapshot and start the reaper.  The caller undoes what this did if
        it raises."""
        self._store = _Store(self._path, strict=strict)
        lines, self._next_seq, replayed = self._store.load()
        self._lock = threading.Lock()       # guards all job state below
        self._changed = threading.Condition(self._lock)   # a job ended
        self._feed = _Feed(self._lock)      # the change feed (see changes())
        self._listeners = self._feed.listeners      # the HTTP layer's long polls
        self._metrics = _Metrics()
        self._jobs = lines                  # jid -> _Job | line; submission order
        self._sched = _Scheduler(self._path, self.max_running, self._jobs, self.capacity,
                                 self.backend.local_resources)
        self._running = _Running(self._sched)   # jid -> handed-over _Job
        self._settling = None               # ended jids whose dependents are due
        self._resolved = set()              # queued jobs whose resolved deps are unjournaled
        self._timers = _Timers()
        self._ended = []                    # jids for on_end, reaper only
        self._flush_due = None
        self._closing = False
        self._compact_lock = threading.Lock()   # one compaction at a time
        self.backend.open(self._path, self.log_dir, self._logs.path)
        self._backend_open = True
        active = self._store.active
        self._retention = _Retention((jid, line) for jid, line in lines.items()
                                     if jid not in active)
        for jid in active:
            self._jobs[jid] = _Job(**json.loads(lines[jid]))
        self._store.open_journal(self._store.generation + 1 if replayed else
                                 self._store.generation)
        # An exit record's key is never reused, even if the journal lost
        # the record of a job that ran (damage set aside, a lost fsync).
        self._next_seq = max(self._next_seq, self.backend.seq_floor())
        with self._lock:
            kills = self._recover()
            starting = self._start_queued()
            self._metrics.restart(self._running)
        self._store.sync()
        if kills:
            self._deliver(kills)
        if starting:
            self._launch_queued(starting)
        if replayed:
            self._compact_now()
        self._reaper = threading.Thread(target=self._reap_loop, name="pman-reaper",
                                        daemon=True)
        self._reaper.start()

    def close(self, *, kill=False):
        """Release this handle.  When the last handle of the directory is
        closed (or always with ``kill=True``): with ``kill=True``, cancel
        queued jobs and kill running ones (signal, grace, SIGKILL) and wait
        for them; flush state, stop the reaper and release the directory.
        Without kill, running jobs keep running and the next manager
        re-adopts them; queued jobs stay queued."""
        self._not_from_reaper("close()")
        if _registry_release(self, every_handle=kill):
            self._shutdown(kill)

    def _shutdown(self, kill):
        """Close the manager for good (see `close`)."""
        if kill:
            with self._lock:
                for job in list(self._sched.queue.values()):
                    if self._sched.queue.get(job.jid) is job:   # not ended by a cascade
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
            self._feed.moved.notify_all()   # changes() waiters return now
        self.backend.wake()
        self._reaper.join()
        self._store.sync()
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

    # -- public API --------------------------------------------------------------

    def run(self, cmd, *, jid=None, auid="", meta=None, env=None, cwd=None,
            timeout=None, extras=None, after=None, after_any=None, group=None, priority=0,
            begin=None, hold=False, retries=0, retry_delay=1, cpus=None, memory=None,
            gpus=None):
        """Start a job and return its record (a dict snapshot).

        *cmd* is a shell command string, or a list of strings run as argv
        without a shell.  *jid* defaults to a number ("12") no job has had.  *env* (a dict,
        or a list of "KEY=value") is merged over the manager's environment;
        *cwd* must exist; *timeout* (s) counts from the start; *meta* is
        any JSON object stored with the job; *extras* holds recorded-only
        fields (pfcon's resource limits).

        Scheduling: *after* (jids) starts the job once each of them has
        finished successfully, *after_any* once each has ended; *group*
        puts it in a group with a limit of its own (`set_group`); *priority*
        (higher first) orders the jobs that may start; *begin* (ISO 8601
        with an offset, or epoch seconds) is the earliest start; *hold*
        queues it until `release`; *retries* runs a failed job again up to
        that many times, *retry_delay* (s) before the first retry, doubled
        before each next one.  *cpus*, *memory* (MiB) and *gpus* ask for
        resources: the job starts once they are free, on cores and GPUs of
        its own, within its memory (see `Resources` in README.rst); pfcon's
        limits in *extras* stand for them when they are not given.

        The job is spawned before this returns unless it waits (for a slot,
        a dependency, a time, a release): then it is queued, and the
        record's ``waiting`` says why.  A spawn failure is not an
        exception: the job ends ``finishedWithError`` with the error in its
        message.  Raises InvalidArgument, or JobConflict if *jid* is queued
        or running.
        """
        spec = _check_spec(cmd, jid=jid, auid=auid, meta=meta, env=env, cwd=cwd,
                           timeout=timeout, extras=extras, after=after, after_any=after_any,
                           group=group, priority=priority, begin=begin, hold=hold,
                           retries=retries, retry_delay=retry_delay, cpus=cpus, memory=memory,
                           gpus=gpus)
        return self._submit([spec])[0]

    def run_many(self, specs):
        """Submit a batch of jobs at once and return their records, in order.

        Each spec is a dict of `run`'s keyword arguments plus ``cmd``, and
        follows exactly the rules of a single `run`.  The batch is all or
        nothing: it is checked whole before anything runs (a bad spec, or
        an unknown key, raises InvalidArgument whose ``index`` is the
        spec's; a jid given twice in the batch, or queued or running,
        raises JobConflict), then journaled as one record and made durable
        with one fsync, then started in order (jobs past ``max_running``
        queue, in order).  A crash while the batch is being written leaves
        none of it: the torn record is dropped when the state is loaded.
        Where a single `run` would raise the backend's refusal
        (SubmitRejected, BackendUnavailable: the SLURM backend), a job of a
        batch ends ``finishedWithError`` with that message instead, since
        the jobs before it are already running.
        """
        checked = _check_specs(specs)
        return self._submit(checked, batch=True) if checked else []

    # -- scheduling --------------------------------------------------------------

    def hold(self, jid):
        """Keep queued job *jid* from starting until `release`; return its
        record.  JobConflict if it is not queued."""
        return self._change_queued(jid, "hold", lambda job: setattr(job, "hold", True))

    def release(self, jid):
        """Let held job *jid* start again; return its record."""
        return self._change_queued(jid, "release", lambda job: setattr(job, "hold", None))

    def set_priority(self, jid, priority):
        """Change queued job *jid*'s priority; return its record."""
        check_priority(priority)
        return self._change_queued(jid, "change the priority of",
                                   lambda job: setattr(job, "priority", priority or None))

    def _change_queued(self, jid, what, change):
        with self._lock:
            job = self._active(jid)
            if job is None or job.sched is not self._sched:
                raise JobConflict(jid, "cannot %s job %s: it is %s, not queued" % (
                    what, jid, "handed to the backend" if job is not None
                    else _entry_status(self._jobs[jid])))
            saved = job.hold, job.priority
            change(job)
            try:
                ticket = self._store.append(job.line(), must=True)
            except StorageError:
                job.hold, job.priority = saved
                raise
            self._sched.place(job)
            self._note_change(jid, NOTSTARTED)
            self.backend.wake()
            record = self._public(_record(job))
        self._store.sync(ticket)
        return record

    def set_group(self, name, *, max_running=None):
        """Set group *name*'s limit of jobs running at once (None: none of
        its own; the manager's ``max_running`` always holds); return the
        group's state (see `groups`).  Kept in the state directory."""
        check_group(name)
        _check_limit(max_running)
        return self._change_groups(name, lambda s: s.limits.__setitem__(name, max_running)
                                   if max_running is not None else s.limits.pop(name, None))

    def groups(self):
        """Every group (those set, and those of queued or running jobs):
        ``{"name", "max_running", "paused", "running", "waiting"}``."""
        with self._lock:
            return self._sched.groups()

    def pause(self, group=None):
        """Start no new job (of *group*, or at all when None); running jobs
        go on.  Kept in the state directory.  Returns `paused()` or the
        group's state."""
        return self._set_paused(group, True)

    def resume(self, group=None):
        """Undo `pause` (of *group*, or of the manager)."""
        return self._set_paused(group, False)

    def paused(self):
        """True while the manager is paused (see `pause`)."""
        with self._lock:
            return self._sched.paused

    def _set_paused(self, group, paused):
        if group is None:
            return self._change_groups(None, lambda s: setattr(s, "paused", paused))
        check_group(group)
        return self._change_groups(group, lambda s: (s.paused_groups.add if paused else
                                                     s.paused_groups.discard)(group))

    def _change_groups(self, name, change):
        with self._lock:
            self._check_open()
            saved = (self._sched.paused, dict(self._sched.limits),
                     set(self._sched.paused_groups))
            change(self._sched)
            try:
                self._sched.save()
            except OSError as e:
                self._sched.paused, self._sched.limits, self._sched.paused_groups = saved
                raise StorageError(self._sched.path, e) from None
            # Why the group's queued jobs wait has changed: the change feed
            # says so (an operator's act, so a pass over the queue is fine).
            for job in list(self._sched.queue.values()):
                if name is None or job.get("group") == name:
                    self._note_change(job.jid, NOTSTARTED)
            self.backend.wake()
            return self._sched.paused if name is None else self._sched.group(name)

    def get(self, jid, *, with_logs=False):
        """The record of job *jid* (JobNotFound if none).  With
        ``with_logs=True`` it also holds ``logs``: the tail of stdout then
        stderr (at most 1,000 lines and 64 KiB)."""
        with self._lock:
            record = self._public(_record(self._entry(jid)))
        if with_logs:
            record["logs"] = self.tail(jid)
        return record

    def jobs(self, *, status=None, auid=None, meta=None, limit=None, after=None,
             newest=False, text=None):
        """Records of jobs in submission order (``newest=True``: newest
        first), filtered by *status* (one string or several), *auid*,
        *meta* (every key must be equal) and *text* (found, ignoring case,
        in the jid, cmd, auid or message).  *after* is a jid: list only the
        jobs that come after it in that order (a page's last jid gives the
        next page).  *limit* caps the count."""
        wanted = _JobFilter(status=status, auid=auid, meta=meta, text=text)
        _check_count("limit", limit)
        out = []
        with self._lock:    # finished jobs are immutable lines: copy the rest
            items = reversed(self._jobs.items()) if newest else self._jobs.items()
            entries = [(jid, _line_of(e)) for jid, e in items]
        started = after is None
        for jid, entry in entries:
            if not started:
                started = jid == after
                continue
            if limit is not None and len(out) >= limit:
                break
            record = wanted.match(entry)
            if record is not None:
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
                entries = [self._entry(jid) for jid in wanted]
                pending = [e for e in entries if not _is_finished(e)]
                left = None if deadline is None else deadline - _time()
                if not pending or (left is not None and left <= 0):
                    break
                self._changed.wait(left)
            records = [self._public(_record(e)) for e in entries]
        if pending:
            raise Timeout("jobs still running after %s s: %s" % (
                timeout, ", ".join(j.jid for j in pending)), records[0] if single else records)
        return records[0] if single else records

    def read_log(self, jid, stream="stdout", *, offset=0, limit=None):
        """Read a job's output: ``{"jid", "stream", "offset", "next_offset",
        "eof", "data"}`` with *data* the bytes from *offset* (at most
        *limit*).  ``eof`` is True once the job has ended and no more bytes
        follow, so a follower loops until it."""
        if stream not in ("stdout", "stderr"):
            raise InvalidArgument("stream must be 'stdout' or 'stderr', not %s" % _shown(stream))
        _check_count("offset", offset, allow_none=False)
        _check_count("limit", limit)
        with self._lock:
            ended = _is_finished(self._entry(jid))
        data, more = self._logs.read(jid, stream, offset, limit)
        return {"jid": jid, "stream": stream, "offset": offset,
                "next_offset": offset + len(data), "eof": ended and not more,
                "data": data}

    def kill(self, jid, signal=signal.SIGTERM, *, grace=None):
        """Send *signal* (a number or a name) to the job's process group and
        return its record.  A signal that asks the job to end (TERM, INT,
        QUIT) is followed by SIGKILL if the job is still running *grace*
        seconds later (default: the manager's); SIGKILL is final.  Those
        cancel a queued job; a finished job is left alone.  Any other
        signal (STOP, CONT, HUP, USR1...) is sent once to a running job and
        noted in its message, with no SIGKILL after it; a queued job raises
        JobConflict."""
        sig = parse_signal(signal)
        grace = self.grace if grace is None else _check_number("grace", grace, False)
        if sig not in ENDING_SIGNALS:
            return self._send(jid, sig)
        with self._lock:
            job = self._active(jid)
            kill = None
            if job is not None and jid not in self._running:
                self._cancel(job, "cancelled before it started (killed on request)",
                             must=True)
            elif job is not None:
                kill = self._signal(job, sig, "on request", grace)
            record = self._public(_record(self._jobs[jid]))
            ticket = self._store._appended
        if kill is None:
            self._store.sync(ticket)
            return record
        try:
            self._deliver([kill])
        except StorageError:
            with self._lock:    # never signalled: say so on disk, as far as it goes
                if self._running.get(jid) is job and not job.kill_sent:
                    job.kill_signal, job.kill_reason = kill.previous
                    self._persist(job)
            raise
        return record

    def _send(self, jid, sig):
        """`kill` of a signal that does not ask the job to end: sent once,
        never a kill of the record (the job's own end is what it records)."""
        name = signal_name(sig)
        if sig not in _SENDABLE:
            raise InvalidArgument("%s cannot be sent to a job: it would end the wrapper shell "
                                  "that records the job's exit code (one of %s can)" % (
                                      name, ", ".join(sorted(signal_name(s) for s in _SENDABLE))))
        with self._lock:
            job = self._active(jid)
            if job is not None:
                self._refresh(job)
            if job is not None and (self._running.get(jid) is not job or job.starting):
                raise JobConflict(jid, "job %s is %s: %s is sent only to a running job"
                                  % (jid, "queued" if jid not in self._running else
                                     "being started", name))
            refused = job is not None and self.backend.refuses(job, sig)
        if refused:
            raise InvalidArgument(refused)
        if job is None or not self.backend.signal(job, sig):
            with self._lock:
                return self._public(_record(self._jobs[jid]))
        with self._lock:
            if self._running.get(jid) is job:
                job.message = "%s; %s sent on request at %s" % (
                    _SENT_RE.sub("", job.message or "running"), name, _now())
                self._persist(job)
            record = self._public(_record(self._jobs[jid]))
        log.info("job %s: %s sent on request", jid, name)
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
            count = self._retention.count - keep
        return self._forget(oldest=count) if count > 0 else 0

    def flush(self):
        """Make every change so far durable, and compact the journal."""
        self._store.sync()
        self._compact_now()

    def etag(self, jid):
        """A string that changes whenever the record of *jid* changes, or
        None while the job is queued or running (its record changes on its
        own).  JobNotFound if there is no such job."""
        with self._lock:
            entry = self._entry(jid)
        if not _is_finished(entry):
            return None
        return "%d-%s-%d" % (_line_seq(entry), _line_status(entry), len(entry))

    def jids(self):
        """Every jid, in submission order."""
        with self._lock:
            return list(self._jobs)

    def nth(self, index):
        """The record of the job at 0-based *index* in submission order; a
        negative *index* counts from the end, as in a list (-1: the last)."""
        if isinstance(index, bool) or not isinstance(index, int):
            raise InvalidArgument("index must be an integer, not %s" % _shown(index))
        with self._lock:
            position = index + len(self._jobs) if index < 0 else index
            if not 0 <= position < len(self._jobs):
                raise JobNotFound("_%d" % index)
            entry = next(itertools.islice(self._jobs.values(), position, None))
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
            self._entry(jid)
        return self._logs.tail(jid, stream)

    def reload(self):
        """Make every change durable, then re-read finished jobs from the
        state directory (snapshot and journals) and settle any running job
        whose process is gone.  A finished job whose record on disk differs
        (same run) takes the disk's record; running and queued jobs are
        untouched.  Returns `counts()`."""
        # Not flush(): a compaction would overwrite the disk with memory
        # before it is read.
        self._store.sync()
        with self._compact_lock:
            # Read without the manager lock: every change is written (if not
            # yet synced) before it is made, so the files are never older
            # than memory; a job that changes meanwhile is active on disk or
            # has another seq, and is left alone below.
            disk, _, _ = _Store(self._path, strict=True).load()
            self._lock.acquire()
        try:
            replaced = {}
            for jid, line in disk.items():
                old = self._jobs.get(jid)
                if (old is not None and _is_finished(old) and old != line
                        and _line_status(line) not in ACTIVE
                        and _line_seq(line) == _line_seq(old)):
                    self._jobs[jid] = line
                    replaced[jid] = old
                    self._note_change(jid, _line_status(line))
            if replaced:
                self._retention.relined(replaced, self._jobs)
            for job in list(self._running.values()):
                self._refresh_safely(job)
        finally:
            self._lock.release()
        return self.counts()

    def counts(self):
        """``{status: number of jobs}`` for all five statuses."""
        return self.changes()["counts"]

    def changes(self, since=None, *, limit=None, timeout=0):
        """The change feed.  Every change of a job's record (submitted,
        started, ended, forgotten, reloaded) gets the next sequence number;
        the latest CHANGES_KEPT are kept.  Returns ``{"seq", "changes",
        "reset", "counts"}``: ``changes`` lists each job changed after
        *since* once, at its latest change, oldest first: ``{"seq", "jid",
        "job"}`` with ``job`` the record as it is now (None once
        forgotten); at most *limit* of them, and then ``seq`` is the last
        one's, else the latest number.  Pass ``seq`` as *since* to go on.
        ``reset`` is True when changes after *since* are no longer all
        known (an older cursor, one of an earlier run, or 0): re-read what
        you show, then go on from ``seq``; ``changes`` is then empty.
        *since* None: start from now (no changes).  ``counts`` is
        `counts()` as of ``seq``'s moment or later.

        With *timeout* (s; None: no limit), wait until there is a change
        after *since* or the time is up."""
        if since is not None and (isinstance(since, bool) or not isinstance(since, int)):
            raise InvalidArgument("since must be an integer sequence number, not %s"
                                  % _shown(since))
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit < 1):
            raise InvalidArgument("limit must be a positive integer")
        _check_number("timeout", timeout)
        if timeout != 0:
            self._not_from_reaper("changes() with a timeout")
        with self._lock:
            self._feed.wait(since, timeout, lambda: self._closing)
            now = self._feed.seq
            head, reset, picked = self._feed.after(since, limit)
            # Finished jobs are immutable lines: copy the rest, parse and
            # count outside the lock.
            lines = [None if self._jobs.get(jid) is None else _line_of(self._jobs[jid])
                     for jid, _ in picked]
            counts = self._feed.counts_at(now)
            if counts is None:      # a finished job's line, or an active one's status
                entries = [e if isinstance(e, str) else e.status for e in self._jobs.values()]
        if counts is None:
            counts = _count_statuses(entries)
            with self._lock:
                self._feed.keep_counts(now, counts)
        found = [{"seq": seq, "jid": jid,
                  "job": None if line is None else self._public(json.loads(line))}
                 for (jid, seq), line in zip(picked, lines)]
        return {"seq": head, "changes": found, "reset": reset, "counts": dict(counts)}

    def stats(self):
        """Counters since this manager opened, for monitoring: ``started``,
        ``spawn_failed``, ``ended`` (``{status: n}``), and ``reaper_lag``
        (``{"buckets": [(upper bound s, n), ...], "sum": s, "count": n}``,
        cumulative, the last bound ``inf``: the time from the reaper's
        wake-up for a job's exit to its record), ``cpu_seconds``
        (``{"user": s, "system": s}``: the sum of the ended jobs' usage)."""
        with self._lock:
            tally, lag = dict(self._metrics.tally), list(self._metrics.lag)
            cpu = dict(self._metrics.cpu)
        buckets, total = [], 0
        for bound, n in zip(LAG_BUCKETS + (math.inf,), lag):
            total += n
            buckets.append((bound, total))
        return {"started": tally.get("started", 0),
                "spawn_failed": tally.get("spawn failed", 0),
                "ended": {s: tally.get(s, 0) for s in STATUSES if s not in ACTIVE},
                "reaper_lag": {"buckets": buckets, "sum": lag[-1], "count": total},
                "cpu_seconds": cpu}

    # -- a job's life: submission ------------------------------------------------

    def _submit(self, specs, batch=False):
        """Accept checked *specs* (see _check_spec) whole or not at all and
        return their records: under the lock, settle jids and conflicts,
        hand over the jobs that get a slot and journal them all as one line;
        without it, one fsync if durable, then start them in order."""
        self._admit(specs, batch)
        with self._lock:
            self._check_open()
            jobs, olds = self._new_jobs(specs, batch)
            starting = self._starting_now(jobs)
            ticket = self._journal_submission(jobs, starting, batch)
            started = set(starting)
            records = self._enter_submission(jobs, olds, started)
        try:
            if self.durable:
                self._store.sync(ticket)
            if starting:
                for record in self._launch(starting, submitter=True, refuse=not batch):
                    records[record["jid"]] = record
        except (StorageError, BackendUnavailable, SubmitRejected):
            self._undo(jobs, olds)
            raise
        with self._lock:    # the backend took the re-runs: their earlier runs' logs go
            for job, old in zip(jobs, olds):
                if old is not None and job in started:
                    self._logs.move(job.jid, "~", None)
        self._maybe_compact()
        return [records[job.jid] for job in jobs]

    def _starting_now(self, jobs):
        """Queue the new *jobs* that wait for no dependency or release, and
        hand over those the scheduler would start now, before they are
        journaled (one line holds them all); the others are queued once
        journaled (`_enter_submission`), where a failed dependency can end
        them.  Caller holds self._lock."""
        plain = set()
        for job in jobs:
            if not (job.pending or job.hold):
                self._sched.add(job)
                plain.add(job)
        starting = []
        while plain:
            job = self._sched.next(len(self._running))
            if job is None:
                break
            if job not in plain:        # an older queued job first: the reaper's
                self._sched.add(job)
                self.backend.wake()
                break
            plain.discard(job)
            self._hand_over(job)
            starting.append(job)
        return starting

    def _admit(self, specs, batch):
        """Ask the backend whether it can ever run each spec, before anything
        is journaled, so that a job it never could (a container without an
        image...) is refused, queued or not."""
        for index, spec in enumerate(specs):
            try:
                self.backend.admit(spec.cmd if spec.argv is None else spec.argv, spec.env,
                                   spec.extras)
            except InvalidArgument as e:
                raise (e._in_batch(index) if batch else e) from None

    def _new_jobs(self, specs, batch):
        """The _Jobs of *specs*, with jids and seqs settled, and the
        finished records they replace (None: a new jid).  Changes nothing.
        Raises JobConflict.  Caller holds self._lock."""
        given = {spec.jid for spec in specs if spec.jid is not None}
        jobs, olds, taken = [], [], {}
        seq = self._next_seq
        submitted = _now()
        for index, spec in enumerate(specs):
            jid = spec.jid
            if jid is None:
                # The seq, as pueue and task-spooler number jobs: short, and
                # never given twice (the state keeps the next seq for good);
                # one a client chose is skipped, never replaced.
                while str(seq) in self._jobs or str(seq) in given or str(seq) in taken:
                    seq += 1
                jid = str(seq)
            where = "batch index %d: " % index if batch else ""
            if jid in taken:
                raise JobConflict(jid, "%sjid %s is given twice in the batch (also at "
                                  "index %d)" % (where, jid, taken[jid]))
            taken[jid] = index
            old = self._jobs.get(jid)
            if old is not None and _entry_status(old) in ACTIVE:
                raise JobConflict(jid, "%sjob %s is %s: kill it or wait for it before "
                                  "running the jid again" % (where, jid, _entry_status(old)))
            job = _Job(jid=jid, status=NOTSTARTED, seq=seq, message="queued", cmd=spec.cmd,
                       argv=spec.argv, auid=spec.auid, meta=spec.meta, env=spec.env,
                       cwd=spec.cwd, timeout=spec.timeout, extras=spec.extras,
                       submitted=submitted, **spec.sched)
            jobs.append(job)
            olds.append(old)
            seq += 1
        self._check_dependencies(jobs, taken, batch)
        return jobs, olds

    def _check_dependencies(self, jobs, batch_jids, batch):
        """Give each of *jobs* its `pending` dependencies: jids known here or
        given in the batch (*batch_jids*: jid -> index), the batch's own
        meant where a jid is both; refuse an unknown one, and a cycle in the
        batch, naming them.  Caller holds self._lock."""
        edges = {}
        for index, job in enumerate(jobs):
            pending = [[jid, False] for jid in job.after or ()] + [
                [jid, True] for jid in job.after_any or ()]
            for jid, _ in pending:
                if jid not in batch_jids and jid not in self._jobs:
                    error = InvalidArgument("unknown dependency %s: a job may wait only for "
                                            "a known jid or one of its batch" % jid)
                    raise (error._in_batch(index) if batch else error)
            # One that has already ended and counts is settled now; one
            # that failed stays, to end the job once it is journaled.
            pending = [p for p in pending if p[0] in batch_jids or _dependency_verdict(
                p[0], self._jobs[p[0]], p[1]) is not True]
            job.pending = pending or None
            edges[job.jid] = [jid for jid, _ in pending if jid in batch_jids]
            too_big = self.capacity.never_fits(self._sched.shape(job))
            if too_big:
                error = InvalidArgument("cannot ever start: " + too_big)
                raise (error._in_batch(index) if batch else error)
        cycle = _find_cycle(edges)
        if cycle:
            raise InvalidArgument("dependency cycle: %s" % " -> ".join(cycle))

    def _journal_submission(self, jobs, starting, batch):
        """Write the records of *jobs* as one journal line (write-ahead: no
        job runs unless it is written) and return its ticket.  On failure
        the slots of *starting* are given back and nothing is recorded.
        Caller holds self._lock."""
        try:
            self._journal_resolved()     # before a re-run replaces a dependency
            lines = []
            for index, job in enumerate(jobs):
                try:
                    lines.append(job.line())
                except (RecursionError, ValueError, TypeError) as e:
                    error = InvalidArgument("meta or extras cannot be stored: %s" % (
                        "nested too deeply" if isinstance(e, RecursionError) else e))
                    raise (error._in_batch(index) if batch else error) from None
            return self._store.append(
                lines[0] if len(lines) == 1 else '{"batch": [%s]}' % ", ".join(lines),
                must=True)
        except (InvalidArgument, StorageError):
            for job in jobs:
                self._running.pop(job.jid, None)
                self._sched.discard(job)
            raise

    def _enter_submission(self, jobs, olds, started):
        """Make the journaled *jobs* the manager's (each replacing its old
        record, if any), queue those not in *started*, and return {jid:
        record} of the queued ones.  Caller holds self._lock."""
        self._next_seq = jobs[-1].seq + 1
        records = {}
        for job, old in zip(jobs, olds):
            if old is not None:
                del self._jobs[job.jid]     # re-run: replaces, moves to the end
                self._retention.count -= 1
                # No output of the old run may show; kept aside until the
                # backend takes the new one, in case it refuses it.
                self._logs.move(job.jid, "", "~" if job in started else None)
            self._jobs[job.jid] = job
            self._note_change(job.jid, NOTSTARTED)
        for job in jobs:
            if job not in started:
                if job.sched is None:   # it waits for something of its own
                    self._enqueue(job)
                records[job.jid] = self._public(_record(self._jobs[job.jid]))
        if not self.durable:
            self._flush_soon(FLUSH_DELAY)   # the reaper syncs soon
        return records

    def _undo(self, jobs, olds):
        """A submission failed before any of its jobs ran (the journal
        could not be synced, or the backend refused a single run): forget
        its jobs and put back the records they replaced."""
        with self._lock:
            forget = []
            for job, old in zip(jobs, olds):
                jid = job.jid
                self._running.pop(jid, None)
                self._sched.discard(job)
                if self._jobs.get(jid) is job:
                    del self._jobs[jid]
                    if old is not None:
                        self._jobs[jid] = old
                        self._retention.count += 1
                        self._store.append(old)
                    else:
                        forget.append(jid)
                    self._note_change(jid, None if old is None else _entry_status(old))
                if old is not None:
                    self._logs.move(jid, "~", "")
            if forget:
                self._store.append(json.dumps({"forget": forget}))

    # -- a job's life: start -----------------------------------------------------

    def _hand_over(self, job):
        """Reserve a running slot for queued *job* and mark it handed to the
        backend (``backend_id == ""``), to be journaled before `_launch`
        starts it: a crash after that leaves a record that recovery
        resolves (the backend's process or exit code is looked up, never
        started twice).  The boot is recorded so that a job handed over
        before a reboot is never taken for one that never ran.  Caller
        holds self._lock."""
        job.backend_id = ""
        job.ident = [None, _BOOT_ID]
        # Journaled with the hand-over: a job a crash left mid-spawn is
        # recorded as started then, not at its submission (which may come
        # long before its begin time or its dependencies' end).
        job.started = _now()
        job.starting = True
        job.message = "starting"
        shape = self._sched.shape(job)
        job.assigned = self.capacity.assign(shape) if any(shape) else None
        self._running[job.jid] = job

    def _env_for(self, job):
        """The job's environment, None for the manager's own.  Where the
        manager has GPUs, a job sees only those assigned to it (none if it
        asked for none), as under SLURM's --gres."""
        gpus = self.capacity.gpus and self.backend.local_resources
        if not (self.env or job.env or gpus):
            return None
        env = dict(os.environ)
        env.update(self.env or ())
        env.update(job.env or ())
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join((job.assigned or {}).get("gpus", ()))
        return env

    def _launch(self, jobs, submitter=False, refuse=False):
        """Start handed-over *jobs* (see _hand_over) whose records are
        journaled (and synced, if durable).  The backend's ``start`` runs
        without self._lock: a slow ``sbatch`` holds up no other call.  A job
        that cannot start ends finishedWithError, except that with *refuse*
        (a single run()) a backend's refusal is raised to the submitter, who
        undoes it.  Returns the records of the jobs as they started if
        *submitter*."""
        kills, records = [], []
        for job in jobs:
            with self._lock:
                if self._jobs.get(job.jid) is not job:
                    continue    # withdrawn meanwhile: its submission failed
            started = _now()
            try:
                if job.cwd is not None and not os.path.isdir(job.cwd):
                    raise FileNotFoundError(errno.ENOENT, "no such directory (cwd)", job.cwd)
                seen, error = self.backend.start(job, self._env_for(job)), None
            except Exception as e:  # EMFILE, EAGAIN, ENOSPC, ENOENT...: this job only
                seen, error = None, e
            with self._lock:
                job.starting = False
                line = None
                if error is None:
                    line = self._started(job, seen._replace(started=started), kills)
                else:
                    self._not_started(job, error, refuse)
                if submitter:   # the line just journaled is the record now
                    records.append(self._public(json.loads(line) if line is not None
                                                else _record(self._jobs[job.jid])))
        if kills:
            self._deliver_safely(kills)
        return records

    def _started(self, job, seen, kills):
        """The backend holds *job* now (*seen*): record it, watch it, and
        add to *kills* the kill that came while it was being started.
        Return its journal line, or None if its record changed again.
        Caller holds self._lock."""
        job.spawned_at = _time()
        self._record_seen(job, seen)
        self.backend.watch(job)
        self._watch(job)
        line = self._persist(job)
        if not job.kill_signal:
            return line
        try:        # killed while it was being started
            kill = self._signal(job, job.kill_signal, job.kill_reason, self.grace)
        except StorageError as e:   # the escalation timer retries
            log.warning("job %s: %s", job.jid, e)
            kill = None
        if kill is not None:
            kills.append(kill)
        return None

    def _not_started(self, job, error, refuse):
        """*job* could not start (*error*): it ends finishedWithError, or
        with *refuse* a backend's refusal is raised.  Caller holds
        self._lock."""
        refused = isinstance(error, (BackendUnavailable, SubmitRejected))
        if refused and refuse:
            raise error
        self._metrics.tally["spawn failed"] += 1
        self._record_end(job, ERROR, None, "%s failed: %s" % (
            "submit" if refused else "spawn", error), started=False, retry=True)

    def _watch(self, job):
        """Set the timers of a job the backend now holds.  Caller holds
        self._lock."""
        self._timeout_timer(job)
        if self.log_limit is not None:
            self._timer(LOG_CHECK_EVERY, "logcheck", job)
        if job.kill_signal and job.kill_signal != signal.SIGKILL:
            job.escalate_at = _time() + self.grace    # a kill sent before a restart
            self._timer(self.grace, "escalate", job)

    def _start_queued(self):
        """Hand queued jobs to the backend while slots are free, journaling
        each (write-ahead); return them for `_launch_queued`, which starts
        them once the lock is released.  Caller holds self._lock."""
        jobs = []
        self._sched.wake_due()
        while True:
            job = self._sched.next(len(self._running))
            if job is None:
                break
            self._hand_over(job)
            try:
                self._store.append(job.line(), must=True)
            except StorageError as e:
                log.warning("%s; queued jobs wait", e)
                self._running.pop(job.jid)
                job.starting, job.backend_id, job.ident, job.assigned = False, None, None, None
                job.started = None
                job.message = "queued"
                self._sched.add(job)
                self._flush_soon(TIMER_RETRY)
                break
            jobs.append(job)
        return jobs

    def _launch_queued(self, jobs):
        """Without self._lock: make the handed-over *jobs* durable (if the
        manager is), then start them.  A journal that cannot be synced puts
        them back at the head of the queue, untouched."""
        if self.durable:
            try:
                self._store.sync()
            except StorageError as e:
                log.warning("%s; queued jobs wait", e)
                with self._lock:
                    for job in jobs:
                        self._running.pop(job.jid, None)
                        if self._jobs.get(job.jid) is not job:
                            continue    # withdrawn meanwhile
                        job.starting, job.backend_id, job.ident = False, None, None
                        job.assigned = job.started = None
                        job.message = "queued"
                        self._sched.add(job)
                        self._persist(job)
                    self._flush_soon(TIMER_RETRY)
                return
        self._launch(jobs)

    # -- a job's life: timers and signals ----------------------------------------

    def _timeout_timer(self, job):
        """A timeout counts from the job's start (SLURM: leaving the queue).
        Caller holds self._lock."""
        if job.timeout is not None and job.started is not None:
            elapsed = max(0.0, _time_since(job.started))
            self._timer(job.timeout - elapsed, "timeout", job)

    def _timer(self, delay, kind, job):
        """Arm a timer for this run of *job*.  Caller holds self._lock."""
        self._timers.push(delay, kind, job)
        self.backend.wake()

    def _live_job(self, jid, seq):
        """The running _Job *jid* if it is still run *seq*, else None.
        Caller holds self._lock."""
        job = self._running.get(jid)
        return job if job is not None and job.seq == seq else None

    def _due_timers(self):
        """Fire the timers that are due; return the _Kills to deliver.
        Caller holds self._lock."""
        kills = []
        for kind, job in self._timers.pop_due(_time(), self._live_job):
            try:
                kill = self._fire(job, kind)
            except Exception:   # e.g. the disk failed: try again
                log.exception("%s timer of job %s failed; retrying in %g s",
                              kind, job.jid, TIMER_RETRY)
                self._timer(TIMER_RETRY, kind, job)
                continue
            if kill is not None:
                kills.append(kill)
        return kills

    def _signal(self, job, sig, reason, grace, kind=None):
        """Decide to send *sig* to *job*: journal it and why first (write(2)
        under the lock), so that a restarted manager still reports -sig,
        and return the _Kill that `_deliver` sends once the lock is
        released and the line is on disk.  None if there is nothing to
        send: the job has already exited (it is collected instead, with its
        real code), or it is still being started (`_launch` sends it).
        Raises StorageError, having changed nothing, if the journal cannot
        be written.  Caller holds self._lock."""
        self._refresh(job)
        if self._running.get(job.jid) is not job:
            return None
        previous = job.kill_signal, job.kill_reason
        if not job.kill_signal:
            job.kill_reason = reason
        job.kill_signal = sig
        try:
            ticket = self._store.append(job.line(), must=True)
        except StorageError:
            job.kill_signal, job.kill_reason = previous
            raise
        if job.starting:
            return None
        return _Kill(job, sig, grace, ticket, previous, kind)

    def _deliver(self, kills):
        """Send the signals of *kills* once the journal holds them, and arm
        what follows each: SIGKILL after the grace, and a re-send.  Called
        without self._lock (``scancel`` is slow); a local job is signalled
        only while it is our unreaped child or proves to be the same process
        (LocalBackend.signal).  Raises StorageError, having sent nothing, if
        the journal cannot be synced."""
        self._store.sync(max(k.ticket for k in kills))
        for kill in kills:
            job, sig = kill.job, kill.sig
            sent_before = job.kill_sent
            job.kill_sent = True    # before the signal: the reaper may collect at once
            if not self.backend.signal(job, sig):
                job.kill_sent = sent_before     # gone by itself: its own code stands
                continue
            if sig == signal.SIGKILL:
                job.escalate_at = None      # only once the SIGKILL went out
            if sig == signal.SIGKILL or kill.kind == "resend":
                continue
            with self._lock:
                if self._running.get(job.jid) is not job:
                    continue
                if kill.grace is not None:
                    job.escalate_at = _time() + kill.grace
                    self._timer(kill.grace, "escalate", job)
                if (job.spawned_at is not None
                        and _time() - job.spawned_at < self.backend.resend_window):
                    # The wrapper's subshell (or, without one, the job's
                    # process until its exec) inherits its TERM handler for
                    # an instant after the fork; a signal landing then is
                    # caught and lost.  Say it again until that instant is
                    # surely over (see _fire).
                    self._timer(RESEND_DELAY, "resend", job)

    def _deliver_safely(self, kills):
        """_deliver for the reaper: a timer whose signal could not be
        journaled fires again after TIMER_RETRY."""
        try:
            self._deliver(kills)
        except StorageError as e:
            log.warning("%s; signals not sent, retrying in %g s", e, TIMER_RETRY)
            with self._lock:
                for kill in kills:
                    if kill.kind is not None and self._running.get(kill.job.jid) is kill.job:
                        self._timer(TIMER_RETRY, kill.kind, kill.job)

    def _cancel(self, job, message, must=False):
        """Caller holds self._lock."""
        self._record_end(job, ERROR, None, message, started=False, must=must)

    # -- a job's life: end -------------------------------------------------------

    def _refresh(self, job):
        """The backend says *job* may have changed: apply what it finds.
        Caller holds self._lock."""
        if self._running.get(job.jid) is not job or job.starting:
            return
        seen = self.backend.check(job)
        if seen is None:
            return
        was_started = job.status == STARTED
        if self._record_seen(job, seen) and seen.state != ENDED:
            if job.status == STARTED and not was_started:   # e.g. left SLURM's queue
                self._timeout_timer(job)
            self._persist(job)

    def _refresh_safely(self, job):
        """_refresh, but a failure settles that one job instead of leaving a
        readable pidfd to spin the reaper.  Caller holds self._lock."""
        try:
            self._refresh(job)
        except Exception as e:
            log.exception("collecting job %s failed", job.jid)
            self._record_end(job, UNDEFINED, None, "pman could not collect the exit "
                         "status: %s" % e)

    def _record_seen(self, job, seen):
        """Apply what the backend found (a `_Seen` of a job it holds) to
        *job*; True if the record changed.  An ENDED job is finished.
        Caller holds self._lock."""
        before = (job.status, job.message, job.pid, job.backend_id)
        for name in ("pid", "ident", "backend_id"):
            value = getattr(seen, name)
            if value is not None:
                setattr(job, name, value)
        if seen.assigned:
            job.assigned = dict(job.assigned or {}, **seen.assigned)
        if seen.state == ENDED:
            job.usage = seen.usage
            if job.started is None and seen.started is not None:   # ran between polls
                job.started = seen.started
            status, code, message, started = _how_it_ended(job, seen)
            self._record_end(job, status, code, message, started=started, retry=True)
            return True
        if seen.message is not None:
            job.message = seen.message
        if seen.state == RUNNING and job.status != STARTED:
            job.status = STARTED
            job.started = seen.started or _now()
        elif seen.state == QUEUED:
            job.started = None
        return (job.status, job.message, job.pid, job.backend_id) != before

    def _record_end(self, job, status, returncode, message, started=True, must=False,
                    retry=False):
        """Record the end of *job* (with *retry*, of this attempt: a failure
        with retries left queues the next, see `_retry`), then settle its
        dependents.  With *must*, a journal that cannot take the line raises
        StorageError and nothing changes.  Caller holds self._lock."""
        if retry and self._retry(job, status, returncode, message, started):
            return
        saved = job.status, job.returncode, job.message, job.ended, job.started
        job.status, job.returncode, job.message = status, returncode, message
        job.ended = _now()
        if not started:
            job.started = None
        line = job.line()
        try:
            self._store.append(line, must=must)
        except StorageError:
            job.status, job.returncode, job.message, job.ended, job.started = saved
            raise
        if self._running.pop(job.jid, None) is not None:
            self.backend.unwatch(job)
        self._jobs[job.jid] = line
        self._note_change(job.jid, status, ended=job)
        self._retention.ended(job.jid, line, self._jobs)
        self._timers.cancel(job, self._live_job)
        self._sched.discard(job)
        self._ended.append(job.jid)
        self._flush_soon(FLUSH_DELAY)
        self._changed.notify_all()
        try:
            self._settle_dependents(job.jid)
        except Exception:       # the end is recorded; a restart settles them again
            log.exception("settling the jobs queued after %s failed", job.jid)

    def _retry(self, job, status, returncode, message, started):
        """If this failed attempt of *job* has a retry left (a failure of
        its own: not a kill through pman, a timeout or a log limit), record
        it in `attempts` and queue the job again, `retry_delay` doubled per
        retry later; return True.  The next attempt gets a seq of its own,
        so that its exit record and timers are never the last one's.
        Caller holds self._lock."""
        attempts = job.attempts or []
        if status != ERROR or job.kill_signal or len(attempts) >= job.get("retries"):
            return False
        attempt = {"returncode": returncode, "started": job.started if started else None,
                   "ended": _now(), "message": message}
        saved = [getattr(job, name) for name in _FIELDS + _SCHED_FIELDS]
        if self._running.pop(job.jid, None) is not None:
            self.backend.unwatch(job)
        self._timers.cancel(job, self._live_job)
        job.attempts = attempts + [attempt]
        job.retry_at = min(MAX_EPOCH, _wall() + job.get("retry_delay") * 2 ** len(attempts))
        job.status, job.returncode, job.message = NOTSTARTED, None, "attempt %d %s" % (
            len(job.attempts), message if message.startswith("spawn") else
            "ended: " + message)
        job.pid = job.backend_id = job.ident = job.started = job.ended = job.usage = None
        job.seq, self._next_seq = self._next_seq, self._next_seq + 1
        try:
            self._store.append(job.line())
        except StorageError:
            for name, value in zip(_FIELDS + _SCHED_FIELDS, saved):
                setattr(job, name, value)
            raise
        self._sched.add(job)
        self._note_change(job.jid, NOTSTARTED)
        self._flush_soon(FLUSH_DELAY)
        return True

    def _enqueue(self, job):
        """Queue *job* (journaled): its dependencies that have ended count
        at once, and one that failed ends it (see _settle_dependents).
        Caller holds self._lock."""
        self._sched.add(job)
        for jid, _ in list(job.pending or ()):
            if _is_finished(self._jobs.get(jid, "")):
                self._settle(job, jid)
                if job.sched is None:
                    return

    def _settle(self, job, jid):
        """Dependency *jid* of queued *job* has ended: it counts (the job's
        line says so, so that forgetting *jid* changes nothing), or the job
        ends without running.  Caller holds self._lock."""
        any_end = next(p[1] for p in job.pending if p[0] == jid)
        verdict = _dependency_verdict(jid, self._jobs.get(jid), any_end)
        if verdict is True:
            self._sched.resolve(job, jid)
            # Journaled at the next flush, not per dependency: a job with
            # thousands would write its whole record for each.  Until then
            # the dependency's own end line says the same.
            self._resolved.add(job)
            self._flush_soon(FLUSH_DELAY)
        elif verdict is not None:
            self._record_end(job, ERROR, None, verdict, started=False)

    def _journal_resolved(self):
        """Journal the queued jobs whose dependencies counted since the last
        time: before a dependency's record is forgotten or replaced by a
        re-run, which would change what a restart decides.  Caller holds
        self._lock."""
        for job in self._resolved:
            if job.sched is self._sched:
                self._persist(job)
        self._resolved.clear()

    def _settle_dependents(self, jid):
        """*jid* has ended: settle the jobs queued after it, and theirs in
        turn when they end without running (a loop, not a recursion: a
        chain may be long).  Caller holds self._lock."""
        if self._settling is not None:
            self._settling.append(jid)
            return
        self._settling = [jid]
        try:
            while self._settling:
                jid = self._settling.pop()
                for job in self._sched.dependents(jid):
                    self._settle(job, jid)
        finally:
            self._settling = None

    # -- recovery ----------------------------------------------------------------

    def _recover(self):
        """Re-adopt or settle the jobs a previous manager left active;
        return the _Kills to send again (a kill journaled before the crash
        may never have gone out, or may have been lost in the wrapper's
        fork window).  Caller holds self._lock."""
        kills, queued = [], []
        for job in [e for e in self._jobs.values() if not _is_finished(e)]:
            try:
                if job.status == NOTSTARTED and job.backend_id is None:
                    seen = self.backend.recover_queued(job)
                else:
                    seen = self.backend.recover(job)
            except PmanError as e:
                log.warning("cannot recover job %s now (%s): it stays as it was", job.jid, e)
                seen = _Seen(RUNNING if job.status == STARTED else QUEUED)
            if seen.state == NEVER:          # never reached the backend
                job.backend_id = job.ident = job.pid = job.assigned = None
                job.status, job.started = NOTSTARTED, None
                job.message = "queued"
                queued.append(job)
                continue
            self._record_seen(job, seen._replace(started=seen.started or job.started
                                                 or job.submitted))
            if seen.state in (RUNNING, QUEUED):
                self._running[job.jid] = job
                self.backend.watch(job)
                self._watch(job)
                self._refresh(job)      # it may have ended while we set up the watch
                if job.kill_signal and self._running.get(job.jid) is job:
                    # Its process may be young enough for the wrapper's fork
                    # window: re-send as after a fresh spawn.
                    job.spawned_at = _time()
                    kills.append(_Kill(job, job.kill_signal, None, 0, None, None))
                log.info("re-adopted job %s (%s)", job.jid, job.pid or job.backend_id)
        # Queued once every active job is settled: a dependency that ended
        # while no manager ran counts (or fails its dependents) now.
        for job in queued:
            if self._jobs.get(job.jid) is job and job.sched is None:
                self._enqueue(job)
        return kills

    # -- records and files (callers hold self._lock where documented) ------------

    def _not_from_reaper(self, what):
        if threading.current_thread() is self._reaper:
            raise PmanError("%s cannot be called from on_end: the callback runs on the "
                            "reaper thread, which it would block" % what)

    def _check_open(self):
        if self._closing or self._options is None:
            raise PmanError("the manager for %s is closed" % self._path)

    def _entry(self, jid):
        """The stored job *jid*, or JobNotFound.  Caller holds self._lock."""
        entry = self._jobs.get(jid) if isinstance(jid, str) else None
        if entry is None:
            raise JobNotFound(jid)
        return entry

    def _active(self, jid):
        """The _Job for *jid* if queued or running, None if finished.
        Caller holds self._lock."""
        entry = self._entry(jid)
        return None if _is_finished(entry) else entry

    @property
    def _feed_seq(self):        # the HTTP layer's long polls read it
        return self._feed.seq

    def _public(self, record):
        """The caller's view of a record: env values hidden, paths added."""
        record["env"] = sorted(record["env"] or ())
        record["stdout"] = self._logs.path(record["jid"], "stdout")
        record["stderr"] = self._logs.path(record["jid"], "stderr")
        record["timestamp"] = record["ended"] or record["started"] or record["submitted"]
        for key in ("ident", "kill_signal", "kill_reason"):
            del record[key]
        for key in ("pending", "retry_at"):
            record.pop(key, None)
        for key, default in SCHED_DEFAULTS.items():
            if key not in record:
                record[key] = [] if default == [] else default
        record.setdefault("attempts", [])
        record.setdefault("assigned", None)
        record.setdefault("usage", None)
        if record["status"] != NOTSTARTED or "waiting" not in record:
            record["waiting"] = None
        return record

    def _persist(self, job):
        """Journal the job's current state; return its line.  Caller holds
        self._lock."""
        line = job.line()
        self._store.append(line)
        self._note_change(job.jid, job.status)
        return line

    def _note_change(self, jid, status, *, ended=None):
        """Give this change of *jid*'s record (now *status*; None: forgotten)
        the next number of the change feed, wake the feed's waiters, and
        count it for the metrics (*ended*: the _Job whose ending `_record_end`
        recorded).  Caller holds self._lock."""
        self._metrics.changed(jid, status, ended)
        self._feed.note(jid)

    def _forget(self, jids=(), *, oldest=0):
        """Forget finished *jids*, or the *oldest* finished jobs."""
        with self._lock:
            if oldest > 0:
                jids = self._retention.oldest(oldest, self._jobs)
            gone = []
            for jid in jids:
                if _is_finished(self._entry(jid)):
                    gone.append(jid)
            if not gone:
                return 0
            try:
                self._journal_resolved()
                ticket = self._store.append(json.dumps({"forget": gone}), must=True)
            except StorageError:
                if oldest > 0:      # they are still the oldest
                    self._retention.put_back([(j, self._jobs[j]) for j in gone])
                raise
            for jid in gone:
                del self._jobs[jid]
                self._note_change(jid, None)
            self._retention.count -= len(gone)
        self._store.sync(ticket)
        with self._lock:            # a jid run again meanwhile keeps its new logs
            for jid in gone:
                if jid not in self._jobs:
                    self._logs.move(jid, "", None)
        return len(gone)

    # -- the reaper thread -------------------------------------------------------

    def _flush_soon(self, delay):
        """Have the reaper sync the journal (and retry what failed) within
        *delay* s.  Caller holds self._lock."""
        due = _time() + delay
        if self._flush_due is None or self._flush_due > due:
            self._flush_due = due
            self.backend.wake()

    def _reap_loop(self):
        while True:
            with self._lock:
                delay = self._timers.next_due()
                delay = None if delay is None else delay - _time()
                due = self._sched.next_due()
                if due is not None:
                    delay = due - _wall() if delay is None else min(delay, due - _wall())
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
        """One turn of the reaper.  Under the lock: collect the jobs the
        backend woke it for, fire due timers, hand queued jobs over.  Then
        without it: send signals, start jobs, forget old jobs, make endings
        durable, call on_end."""
        with self._lock:
            turn = self._reap_locked(jobs)
        if turn.kills:
            self._deliver_safely(turn.kills)
        if turn.starting:
            self._launch_queued(turn.starting)
        if turn.doomed > 0:
            self._forget(oldest=turn.doomed)
        if turn.flush:
            self._sync_due(turn.idle)
        for record in turn.ended:
            try:
                self.on_end(record)
            except Exception:
                log.exception("on_end callback failed for job %s", record["jid"])

    def _reap_locked(self, jobs):
        """The part of a reaper's turn done under the lock: what it decided
        is a `_Turn`.  Caller holds self._lock."""
        woke = _time()
        for job in jobs:
            self._refresh_safely(job)
            if self._running.get(job.jid) is not job:
                self._metrics.observe_lag(_time() - woke)
        kills = self._due_timers()
        starting = self._start_queued()
        doomed = 0
        if self.keep_finished is not None:
            doomed = self._retention.count - self.keep_finished
        flush = self._flush_due is not None and self._flush_due <= _time()
        idle = False
        if flush:
            self._flush_due = None
            self._journal_resolved()
            idle = not self._running
        ended = []
        if self.on_end is not None:
            ended = [self._public(_record(self._jobs[jid]))
                     for jid in self._ended if jid in self._jobs]
        self._ended = []
        return _Turn(kills, starting, doomed, flush, idle, ended)

    def _sync_due(self, idle):
        """The flush the reaper was due: sync the journal (retried later if
        it fails), let an *idle* backend tidy up, compact if it is time."""
        try:
            self._store.sync()
        except StorageError as e:
            log.warning("%s; retrying in %g s", e, TIMER_RETRY)
            with self._lock:
                self._flush_soon(TIMER_RETRY)
            idle = False
        if idle:
            with self._lock:
                if not self._running:
                    self.backend.idle()
        self._maybe_compact()

    def _fire(self, job, kind):
        """Act on a due timer; return a _Kill to deliver, or None.  Caller
        holds self._lock."""
        if kind == "timeout":
            return self._signal(job, signal.SIGTERM, "timed out after %g s" % job.timeout,
                                self.grace, kind)
        if kind == "resend":
            if job.kill_signal and job.kill_signal != signal.SIGKILL:
                age = _time() - job.spawned_at
                if 2 * age < self.backend.resend_window:    # again at twice the age
                    self._timer(age, "resend", job)
                return _Kill(job, job.kill_signal, None, 0, None, "resend")
        elif kind == "escalate":
            if job.escalate_at is not None and _time() >= job.escalate_at - 0.001:
                return self._signal(job, signal.SIGKILL, job.kill_reason, None, kind)
        elif kind == "logcheck":
            self._timer(LOG_CHECK_EVERY, "logcheck", job)
            stream = self._logs.over_limit(job.jid, self.log_limit)
            if stream is not None and not job.kill_signal:
                return self._signal(job, signal.SIGTERM, "%s exceeded the log limit "
                                    "of %d bytes" % (stream, self.log_limit),
                                    self.grace, kind)
        return None

    # -- compaction --------------------------------------------------------------

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
                lines = [_line_of(e) for e in self._jobs.values()]
                next_seq = self._next_seq
            self._store.write_snapshot(lines, gen, next_seq)
        finally:
            self._compact_lock.release()


@atexit.register
def _close_all():
    """At exit, flush every open manager; running jobs keep running."""
    with _registry_lock:
        managers = list(_registry.values())
    for manager in managers:
        try:
            if _registry_release(manager, every_handle=True):
                manager._shutdown(kill=False)
        except Exception:
            log.exception("closing %r at exit", manager)


# ---------------------------------------------------------------------------
# HTTP: limits, errors and the job objects
# ---------------------------------------------------------------------------

# Thin by design: every route parses and validates the request, calls one
# JobManager method and serializes the result.  Job logic lives above.

MAX_BODY = 1 << 20          # bytes in a request body
MAX_BATCH = 10000           # jobs in one POST /api/v1/jobs (bounds the reply and its time)
MAX_HEAD = 1 << 16          # bytes of a request line and its headers
MAX_HEADERS = 100           # header fields of a request (as http.client allows)
MAX_EMPTY_LINES = 8         # empty lines ignored before a request line (RFC 9112 2.2)
MAX_WAIT = 60.0             # cap of a long poll, in seconds
REQUEST_TIMEOUT = 10.0      # s for a whole request (head and body) to arrive; also
                            # the longest a kept-alive connection may sit idle
KEEPALIVE_LINGER = 0.05     # s a handler thread waits for a connection's next request
                            # before handing the connection back to the reader
DEFAULT_LISTENERS = 64
LISTENER_WAIT = 0.2         # s a complete request waits for a free handler thread; then 503
DEFAULT_LONG_POLLS = 256    # ?wait requests waiting at once; past it, 503
FD_RESERVE = 64             # fds never used for connections (state files, a spawn's)
PAGE_SIZE, MAX_PAGE = 100, 1000
RAW_CHUNK = 1 << 20         # bytes at most in one raw log reply (?raw=1)
SENT_META = "sent_meta"     # the extras key of the meta a command-dialect run sent
MAX_WARNED_FIELDS = 100     # unknown field names remembered (each logged once)
CPU_SAMPLE = 0.1            # seconds between the two /proc/stat reads of hello sysinfo
EVENT_WAITERS = 256         # long polls of /api/v1/events waiting at once; past it,
                            # a poll is answered at once ("busy": true)
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The reason label of pman_jobs_waiting: _Scheduler.reason's labels.
METRIC_REASONS = ("after", "held", "paused", "full", "begin", "retry", "resources")


class _Encoded:
    """A reply body already encoded: JSON bytes unless *content_type* says
    otherwise; *headers* are extra (name, value) pairs."""

    __slots__ = ("data", "content_type", "headers")

    def __init__(self, data, content_type="application/json", headers=()):
        self.data = data
        self.content_type = content_type
        self.headers = headers


class HTTPError(PmanError):
    """A request the HTTP layer refuses.  Attribute: ``status``."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


# Library errors -> HTTP status codes, in one place.
_HTTP_STATUS = ((HTTPError, None), (JobNotFound, 404), (JobConflict, 409),
                (InvalidArgument, 400), (Timeout, 408), (StateCorrupt, 503),
                (BackendUnavailable, 503), (SubmitRejected, 400), (StorageError, 507),
                (PmanError, 400))


def _status_for(exc):
    for cls, status in _HTTP_STATUS:
        if isinstance(exc, cls):
            return exc.status if status is None else status
    return 500


_REASONS = {s.value: s.phrase for s in http.HTTPStatus}


def _is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _job_object(record, enforced=()):
    """The resource dialect's job object: pfcon's recorded fields at the
    top level, and the limits pman does not enforce (on this backend:
    *enforced* are those it does) named as such."""
    extras = record.pop("extras") or {}
    extras.pop(SENT_META, None)
    record.update(extras)
    # A started job's record says whether its memory is enforced (a cgroup
    # could be made for it or not), whatever the backend can do now.
    memory = (record.get("assigned") or {}).get("memory_enforced")
    enforced = set(enforced)
    if memory is not None:
        enforced.discard("memory_limit")
        if memory:
            enforced.add("memory_limit")
    record["not_enforced"] = sorted(k for k in ("cpu_limit", "memory_limit", "gpu_limit",
                                                "number_of_workers")
                                    if k in extras and k not in enforced)
    if memory is False and "memory_limit" not in extras:
        record["not_enforced"].append("memory")
    return record


def _with_logs(manager, record):
    """The job object of *record* with ``logs``, the tail of its output
    ("" before the job prints, or once it is gone)."""
    try:
        record["logs"] = manager.tail(record["jid"])
    except JobNotFound:         # deleted by another request meanwhile
        record["logs"] = ""
    return _job_object(record, manager.backend.enforced)


def _tree_info(record, manager):
    """INFO, the original runner's fields, computed from the record.  As in
    the original, ``started`` is true only while the job runs, while
    ``startTrigger`` stays true once it has started."""
    jid = record["jid"]
    started = record["started"] is not None
    done = record["status"] not in ACTIVE
    return {"cmd": record["cmd"], "jid": jid, "auid": record["auid"],
            "pid": record["pid"], "started": started and not done, "startTrigger": started,
            "done": done, "doneTrigger": done, "returncode": record["returncode"],
            "startstamp": record["started"] or "", "endstamp": record["ended"] or "",
            "status": record["status"], "message": record["message"],
            "stdout": manager.tail(jid, "stdout"), "stderr": manager.tail(jid, "stderr")}


def job_tree(record, manager):
    """The original pman's view of one job, projected from its record on
    demand (never stored): see README.rst, "Command dialect".

    pman 0.5 kept each run's INFO under ``start/N`` and ``end/N``, and once
    every run had ended added one more entry holding only a marker
    (``{"allJobsStarted": true}``, ``{"allJobsDone": true}``), which its
    ``startInfo``/``endInfo`` then showed; before that they were
    ``false``.  Clients poll for the markers, and the original README reads
    the pid and status from ``endInfo``: so ``startInfo``/``endInfo`` hold
    the run's INFO under "0" and, once the job has ended, the marker too."""
    info = _tree_info(record, manager)
    start_info = end_info = False
    start, end = {}, {}
    if record["status"] != NOTSTARTED:
        start_info = {"0": info}
        start["0"] = {"startInfo": {"0": info}}
    if record["status"] not in ACTIVE:
        start_info = {"0": info, "allJobsStarted": True}
        end_info = {"0": info, "allJobsDone": True}
        end["0"] = {"endInfo": {"0": info}}
        start["1"] = {"startInfo": {"allJobsStarted": True}}
        end["1"] = {"endInfo": {"allJobsDone": True}}
    # d_meta: the whole meta a command-dialect run sent; for other jobs (and
    # those run before pman kept it) the meta that was stored.
    sent = (record["extras"] or {}).get(SENT_META, record["meta"])
    return {"jid": record["jid"], "cmd": record["cmd"], "auid": record["auid"],
            "d_meta": json.dumps(sent), "jobCount": 1, "startInfo": start_info,
            "endInfo": end_info, "start": start, "end": end}


def _walk(tree, parts, path):
    node = tree
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            raise HTTPError(404, "no such path: %s" % _shown(path))
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
        raise InvalidArgument("%r must be a string, not %s" % (key, _shown(value)))
    return value


def _jid_arg(value):
    """A jid as a client sent it: an integer (not a bool) is taken as its
    decimal string, as the original pman did; anything else is checked
    later, as it is."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def _memory():
    """``[total, available]`` in bytes, from /proc/meminfo: the first two
    fields of the original's ``psutil.virtual_memory()`` list (None if
    unreadable)."""
    sizes = {}
    try:
        with open("/proc/meminfo", encoding="ascii", errors="replace") as f:
            for line in f:
                name, _, rest = line.partition(":")
                words = rest.split()
                if name in ("MemTotal", "MemAvailable") and words and words[0].isdigit():
                    sizes[name] = int(words[0]) * (1024 if words[1:] == ["kB"] else 1)
    except OSError:
        return None
    if "MemTotal" not in sizes:
        return None
    return [sizes["MemTotal"], sizes.get("MemAvailable", sizes["MemTotal"])]


def _cpu_times():
    """(busy, total) jiffies of all CPUs from /proc/stat's "cpu" line."""
    with open("/proc/stat", encoding="ascii", errors="replace") as f:
        words = f.readline().split()
    if words[:1] != ["cpu"]:
        raise ValueError("no cpu line in /proc/stat")
    # user nice system idle iowait irq softirq steal (guest is within user)
    ticks = [int(w) for w in words[1:9]]
    return sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0), sum(ticks)


def _cpu_percent():
    """(percent of all CPUs busy, where the figure comes from): /proc/stat
    sampled over CPU_SAMPLE seconds, else the 1-minute load average per
    CPU (capped at 100)."""
    try:
        busy0, total0 = _cpu_times()
        _sleep(CPU_SAMPLE)
        busy1, total1 = _cpu_times()
        if total1 > total0:
            return (round(100.0 * (busy1 - busy0) / (total1 - total0), 1),
                    "/proc/stat over %g s" % CPU_SAMPLE)
    except (OSError, ValueError):
        pass
    return (round(min(100.0, 100.0 * os.getloadavg()[0] / (os.cpu_count() or 1)), 1),
            "1-minute load average per CPU")


def _json_object(data):
    """A request body as a JSON object within MAX_DEPTH, or HTTPError 400."""
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


# ---------------------------------------------------------------------------
# The command dialect
# ---------------------------------------------------------------------------

class _CommandDialect:
    """``POST /api/v1/cmd``: the original pman's actions.  Each handler
    takes (meta, payload) and returns (ok, d_ret) or (ok, d_ret, extra
    envelope fields); `dispatch` calls the one ACTIONS names."""

    def __init__(self, server):
        self.server = server
        self.manager = server.manager

    def _hits(self, meta):
        key = _get_str(meta, "key", "jid")
        value = meta.get("value", meta.get("jid"))
        if value is None:
            raise InvalidArgument("'value' (or 'jid') is required")
        return self.manager.find(key, _jid_arg(value) if key == "jid" else value)

    @staticmethod
    def _no_hit(with_status=False):
        d_ret = {"-1": {"noJobFound": {"endInfo": {"allJobsDone": None}}}}
        if with_status:
            d_ret["l_status"] = []
        return False, d_ret

    def run(self, meta, payload):
        manager = self.manager
        exec_ = payload.get("exec") if isinstance(payload.get("exec"), dict) else {}
        cmd = meta.get("cmd", exec_.get("cmd"))
        if not isinstance(cmd, str):
            raise InvalidArgument("run needs meta.cmd (or exec.cmd), a string")
        stored = {k: v for k, v in meta.items() if k not in ("cmd", "jid", "auid", "threaded")}
        # pfcon's fields in meta count as in the resource dialect (an image
        # runs on the podman backend); they stay in meta as well.
        extras = {k: meta[k] for k in PFCON_FIELDS if k in meta}
        extras[SENT_META] = meta
        record = manager.run(cmd, jid=_jid_arg(meta.get("jid")),
                             auid=_get_str(meta, "auid", ""), meta=stored, extras=extras)
        return True, _with_logs(manager, record), {"jobRootDir": record["jid"]}

    def status(self, meta, payload, with_status=True):
        hits = self._hits(meta)
        if not hits:
            return self._no_hit(with_status)
        d_ret = {}
        for i, rec in enumerate(hits):
            trigger = [] if rec["status"] == NOTSTARTED else [rec["started"] is not None]
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
        hits = self._hits(meta)
        if not hits:
            return self._no_hit()
        d_ret = {}
        for i, rec in enumerate(hits):
            tree = job_tree(rec, self.manager)
            d_ret["%d.0" % i] = {rec["jid"]: {"startInfo": tree["startInfo"]}}
            d_ret["%d.1" % i] = {rec["jid"]: {"endInfo": tree["endInfo"]}}
        return True, d_ret

    def search(self, meta, payload):
        hits = self._hits(meta)
        if not hits:
            return self._no_hit()
        path = _get_str(meta, "path")
        if path is None and not any(k in meta for k in ("job", "when", "field")):
            # As 0.5: each hit is its key's own value, not the whole tree.
            key = meta.get("key", "jid")
            return True, {str(i): {rec["jid"]: {key: rec[key] if key in rec
                                                else rec["meta"].get(key, meta.get("value"))}}
                          for i, rec in enumerate(hits)}
        if path is None:
            job = meta.get("job", "0")
            if isinstance(job, bool) or not isinstance(job, (str, int)):
                raise InvalidArgument("'job' must be a string or an integer, not %s"
                                      % _shown(job))
            job = str(job)
            when = _get_str(meta, "when", "end")
            if when not in ("start", "end"):
                raise InvalidArgument("'when' must be 'start' or 'end', not %s" % _shown(when))
            parts = [when, job, when + "Info", job]
            field = _get_str(meta, "field")
            if field:
                parts.append(field)
        else:
            parts = [p for p in (path or "").split("/") if p]
        # Each hit is the subtree at its full path, wrapped in that path
        # under the jid, as a GET walk wraps it: clients read the field's
        # name from the nesting.
        d_ret = {}
        for i, rec in enumerate(hits):
            tree = job_tree(rec, self.manager)
            try:
                value = _walk(tree, parts, "/".join(parts))
            except HTTPError:
                continue
            d_ret[str(i)] = {rec["jid"]: _wrap(parts, value)}
        if not d_ret:
            return self._no_hit()
        return True, d_ret

    def get(self, meta, payload):
        path = _get_str(meta, "path", required=True)
        parts = [p for p in path.split("/") if p]
        if not parts:
            raise InvalidArgument("'path' must name a job, e.g. /<jid>/endInfo")
        record = _record_by_name(self.manager, parts[0])
        value = _walk(job_tree(record, self.manager), parts[1:], path)
        return True, _wrap([record["jid"]] + parts[1:], value)

    def hello(self, meta, payload):
        ask = meta.get("askAbout", "timestamp")
        asks = ask if isinstance(ask, list) else [ask]
        d_ret = {}
        for item in asks:
            if item == "timestamp":
                d_ret["timestamp"] = {"now": datetime.now().strftime("%Y%m%d%H%M%S.%f")}
            elif item == "sysinfo":
                cpu_percent, source = _cpu_percent()
                d_ret["sysinfo"] = {
                    "system": platform.system(), "machine": platform.machine(),
                    "platform": platform.platform(), "version": platform.version(),
                    "release": platform.release(), "uname": list(os.uname()),
                    "cpucount": os.cpu_count(), "loadavg": list(os.getloadavg()),
                    "cpu_percent": cpu_percent, "cpu_percent_source": source,
                    "memory": _memory(), "hostname": socket.gethostname(),
                    "python": platform.python_version(), "pman": __version__}
            elif item == "echoBack":
                text = meta.get("echoBack", "")
                if not isinstance(text, str):
                    raise InvalidArgument("'echoBack' must be a string")
                d_ret["echoBack"] = {"msg": text}
            else:
                raise InvalidArgument("askAbout must be timestamp, sysinfo or echoBack, not %s"
                                      % _shown(item))
        return True, d_ret

    @staticmethod
    def _jid(meta):
        jid = _jid_arg(meta.get("jid", meta.get("value")))
        if jid is None:
            raise InvalidArgument("'jid' (or 'value') is required")
        return check_jid(jid)

    def kill(self, meta, payload):
        record = self.manager.kill(self._jid(meta), meta.get("signal", "SIGTERM"),
                                   grace=_number_or_none(meta.get("grace"), "grace"))
        return True, _with_logs(self.manager, record)

    def delete(self, meta, payload):
        jid = self._jid(meta)
        self.manager.remove(jid, kill=True)
        return True, {"action": "Delete Job", "job_id": jid,
                      "status": "Job deleted successfully"}

    def DBctl(self, meta, payload):
        manager = self.manager
        do = meta.get("do")
        if do == "save":
            manager.flush()
            return True, {"saved": manager.counts()}
        if do == "load":
            return True, {"loaded": manager.reload()}
        if do == "clear":
            return True, {"cleared": manager.forget()}
        raise InvalidArgument("DBctl needs do: save, load or clear, not %s" % _shown(do))

    def quit(self, meta, payload):
        self.manager.flush()
        self.server.stop_soon()
        return True, {}

    ACTIONS = ("run", "status", "done", "info", "search", "get", "hello", "kill",
               "delete", "DBctl", "quit")

    @staticmethod
    def _request(body):
        """(payload, action, meta) of a request, with or without its
        ``payload`` wrapper."""
        payload = body.get("payload", body)
        if not isinstance(payload, dict):
            raise InvalidArgument("'payload' must be a JSON object")
        meta = payload.get("meta", {})
        if not isinstance(meta, dict):
            raise InvalidArgument("'meta' must be a JSON object")
        return payload, payload.get("action"), meta

    def dispatch(self, body):
        payload, action, meta = self._request(body)
        if action not in self.ACTIONS:
            raise InvalidArgument("unknown action %s: one of %s"
                                  % (_shown(action), ", ".join(self.ACTIONS)))
        result = getattr(self, action)(meta, payload)
        ok, d_ret = result[0], result[1]
        envelope = {"status": ok, "action": action, "meta": meta, "path": "/api/v1/cmd",
                    "RESTverb": "POST", "d_ret": d_ret}
        if len(result) > 2:
            envelope.update(result[2])
        return envelope

    def db_control(self, body):
        """``PUT /api/v1/cmd``: 0.5's control of its database, ``{"action":
        "run", "meta": {"context": "db", "operation": "save" or "load"}}``
        (save if no operation is given), done as DBctl does it."""
        payload, action, meta = self._request(body)
        context = meta.get("context")
        if action != "run" or not isinstance(context, str) or context.lower() != "db":
            raise InvalidArgument('PUT /api/v1/cmd controls the state: send {"action": '
                                  '"run", "meta": {"context": "db", "operation": "save" '
                                  'or "load"}}')
        operation = meta.get("operation", "save")
        if operation not in ("save", "load"):
            raise InvalidArgument("operation must be save or load, not %s"
                                  % _json_shown(operation))
        if meta.get("dbpath") is not None:
            raise InvalidArgument("'dbpath': pman keeps its state in its state directory, "
                                  "and saves or loads only that")
        ok, d_ret = self.DBctl({"do": operation}, payload)
        return {"status": ok, "action": action, "meta": meta, "path": "/api/v1/cmd",
                "RESTverb": "PUT", "d_ret": d_ret}


def _number_or_none(value, name):
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise InvalidArgument("%s must be a number, not %s" % (name, _shown(value))) from None
    return _check_number(name, value)


def _flag(query, name, default):
    """A boolean query parameter: 1/true/yes or 0/false/no."""
    value = query.get(name)
    if value is None:
        return default
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise HTTPError(400, "%s must be 1 or 0 (true or false), not %s" % (name, _shown(value)))


def _record_by_name(manager, name):
    """A job by jid, or by ``_N`` (0-based submission index; ``_-1`` is
    the last job)."""
    if re.fullmatch(r"_-?[0-9]{1,18}", name):
        return manager.nth(int(name[1:]))
    return manager.get(check_jid(name))


# pman 3.0-3.5's way to give the command (sent by pfcon 3.x-4.0), and the
# fields its parser and pman 4+'s require of every body in pfcon's form.
PMAN3_FIELDS = ("cmd_args", "cmd_path_flags", "selfexec", "selfpath", "execshell")
_PFCON_REQUIRED = ("jid", "auid", "number_of_workers", "cpu_limit", "memory_limit",
                   "gpu_limit", "image", "type")
_PMAN3_REQUIRED = _PFCON_REQUIRED + ("cmd_args", "selfexec", "selfpath", "execshell")
_PMAN4_REQUIRED = _PFCON_REQUIRED + ("entrypoint", "args")
_PFCON_INTEGERS = ("number_of_workers", "cpu_limit", "memory_limit", "gpu_limit")
PLUGIN_TYPES = ("ds", "fs", "ts")
_RESOURCE_FIELDS = {"jid", "cmd", "entrypoint", "args", "auid", "env", "cwd", "timeout",
                    "meta"} | set(PFCON_FIELDS) | set(SCHED_DEFAULTS) | set(PMAN3_FIELDS)


def _json_shown(value):
    """A bad value of a JSON body as an error message quotes it: as JSON
    (null, not Python's None), cut as `_shown` cuts it."""
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


def _pfcon_integer(value):
    """A pfcon limit as pman 3.2+'s parser takes it (``int(value)``): an
    integer, or the decimal string that pfcon 3.0-3.3 forwarded from its
    form; None if it is neither."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?[0-9]{1,18}\s*", value):
        return int(value)
    return None


def _pman3_command(body, problems):
    """pman 3.x's command as entrypoint and args: ``execshell``, then
    ``selfpath``/``selfexec``, then ``cmd_args`` split as a shell would;
    ``cmd_path_flags`` (comma-separated) become ``args_path_flags``."""
    for name in PMAN3_FIELDS:
        value = body.get(name)
        if value is not None and not isinstance(value, str):
            problems[name] = "%r must be a string, not %s" % (name, _json_shown(value))
    if problems:
        return None, None, None
    try:
        args = shlex.split(body["cmd_args"])
    except ValueError as e:
        problems["cmd_args"] = "'cmd_args' cannot be split as a shell would: %s" % e
        return None, None, None
    entry = [body["execshell"], os.path.join(body["selfpath"], body["selfexec"])]
    flags = [f for f in (body.get("cmd_path_flags") or "").split(",") if f]
    return entry, args, flags


# ---------------------------------------------------------------------------
# The API routes
# ---------------------------------------------------------------------------

class _Api:
    """The API's routes, one object per server, thin over its JobManager.
    Each ``route_*`` takes (groups, query, body): the path's named groups,
    the query as a dict, the JSON body (None but for a POST) and returns
    (status, obj); errors are raised and mapped by _status_for."""

    def __init__(self, server):
        self.server = server
        self.manager = server.manager

    @staticmethod
    def _only(query, *names):
        extra = set(query) - set(names)
        if extra:
            raise HTTPError(400, "unknown query parameter(s): %s" % ", ".join(sorted(extra)))

    @staticmethod
    def _limit(query):
        limit = query.get("limit", str(PAGE_SIZE))
        if not re.fullmatch(r"[0-9]{1,6}", limit) or not 0 < int(limit) <= MAX_PAGE:
            raise HTTPError(400, "limit must be an integer from 1 to %d" % MAX_PAGE)
        return int(limit)

    def route_root(self, groups, query, body):
        self._only(query)
        # storage_type as pman 6 names it: jobs read and write this host's files
        return 200, {"status": True, "path": "/api/v1",
                     "GET": {jid: {} for jid in self.manager.jids()},
                     "server_version": __version__,
                     "container_env": self.manager.backend.name, "storage_type": "host"}

    def _submission(self, body):
        """A resource-dialect job body as run()'s keyword arguments, and
        the unknown fields it ignores.  A body in pfcon's form (pman 3.x's
        ``cmd_args``..., or ``type`` and ``number_of_workers`` without
        ``cmd``) is checked as pman's parser checks it, every problem named
        at once; this pman's own form keeps its own rules."""
        if not isinstance(body, dict):
            raise InvalidArgument("a job must be a JSON object, not %s" % _json_shown(body))
        # pman 3.x ignores fields it does not know, so a pfcon that sends a
        # new one keeps working: leave them out, but say so.
        ignored = sorted(set(body) - _RESOURCE_FIELDS)
        if ignored:
            self.server.note_ignored(ignored)
        pman3 = any(k in body for k in PMAN3_FIELDS)
        cmd = body.get("cmd")
        if cmd is not None and ("entrypoint" in body or pman3):
            raise InvalidArgument("give either 'cmd' or 'entrypoint' + 'args' (or pman "
                                  "3.x's 'cmd_args', 'selfexec'...), not both")
        if pman3 and "entrypoint" in body:
            raise InvalidArgument("give either 'entrypoint' + 'args' or pman 3.x's "
                                  "'cmd_args', 'selfexec'..., not both")
        problems = {}
        if pman3 or (cmd is None and "type" in body and "number_of_workers" in body):
            for name in _PMAN3_REQUIRED if pman3 else _PMAN4_REQUIRED:
                if body.get(name) is None:
                    problems[name] = "Missing required parameter %r" % name
        extras = {k: body[k] for k in PFCON_FIELDS if k in body}
        for name in _PFCON_INTEGERS:
            if extras.get(name) is not None:
                extras[name] = _pfcon_integer(extras[name])
                if extras[name] is None:
                    problems[name] = "%r: %s is not an integer" % (name, _json_shown(body[name]))
        if extras.get("type") is not None and extras["type"] not in PLUGIN_TYPES:
            problems["type"] = "'type': %s is not a valid choice (%s)" % (
                _json_shown(extras["type"]), ", ".join(PLUGIN_TYPES))
        if pman3:
            entry, args, flags = _pman3_command(body, problems)
            if flags:
                extras["args_path_flags"] = flags
        elif cmd is None:
            entry, args = body.get("entrypoint"), body.get("args", [])
            for name, value in (("entrypoint", entry), ("args", args)):
                if value is None and name in problems:
                    continue
                if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
                    problems[name] = "%r must be a list of strings (or give 'cmd'), not %s" \
                        % (name, _json_shown(value))
            if entry == []:
                problems["entrypoint"] = "'entrypoint' cannot be empty"
        elif not isinstance(cmd, str):
            problems["cmd"] = "'cmd' must be a string, not %s" % _json_shown(cmd)
        if problems:
            raise InvalidArgument("; ".join(problems[name] for name in sorted(problems)))
        if cmd is None:
            cmd = entry + args
        meta = body.get("meta")
        if meta is not None and not isinstance(meta, dict):
            raise InvalidArgument("'meta' must be a JSON object, not %s" % _json_shown(meta))
        jid = _jid_arg(body.get("jid"))
        if isinstance(jid, str) and jid.startswith("/"):
            jid = jid[1:]           # pfcon's "/pfcon-4": pman 3.x strips the slash
        # The scheduling fields go to run() as sent (null: the default),
        # which checks them and names the field of a bad one.
        sched = {k: body[k] for k in SCHED_DEFAULTS if k in body}
        return dict(cmd=cmd, jid=jid, auid=_get_str(body, "auid", ""), meta=meta,
                    env=body.get("env"), cwd=_get_str(body, "cwd"),
                    timeout=_number_or_none(body.get("timeout"), "timeout"),
                    extras=extras, **sched), ignored

    def _created(self, record, ignored):
        job = _with_logs(self.manager, record)
        if ignored:
            job["ignored_fields"] = ignored
        return job

    def route_create(self, groups, query, body):
        self._only(query)
        spec, ignored = self._submission(body)
        return 201, self._created(self.manager.run(**spec), ignored)

    def route_create_batch(self, groups, query, body):
        self._only(query)
        unknown = set(body) - {"jobs"}
        if unknown:
            raise InvalidArgument("unknown field(s) in a batch: %s (send {\"jobs\": [...]})"
                                  % _shown(sorted(unknown)))
        jobs = body.get("jobs")
        if not isinstance(jobs, list) or not jobs:
            raise InvalidArgument("'jobs' must be a non-empty list of job objects, not %s"
                                  % _shown(jobs))
        if len(jobs) > MAX_BATCH:
            raise InvalidArgument("a batch takes at most %d jobs, not %d" % (MAX_BATCH, len(jobs)))
        specs, ignored = [], []
        for index, job in enumerate(jobs):
            try:
                spec, unknown = self._submission(job)
            except InvalidArgument as e:
                raise e._in_batch(index) from None
            specs.append(spec)
            ignored.append(unknown)
        records = self.manager.run_many(specs)
        return 201, {"jobs": [self._created(r, i) for r, i in zip(records, ignored)]}

    def route_list_jobs(self, groups, query, body):
        meta = {k[5:]: v for k, v in query.items() if k.startswith("meta.")}
        self._only({k: v for k, v in query.items() if not k.startswith("meta.")},
                   "status", "auid", "q", "limit", "after", "order")
        order = query.get("order", "oldest")
        if order not in ("oldest", "newest"):
            raise HTTPError(400, "order must be 'oldest' (submission order) or 'newest'")
        limit = self._limit(query)
        status = query["status"].split(",") if query.get("status") else None
        after = query.get("after") or None
        if after is not None:
            check_jid(after)
        found = self.manager.jobs(status=status, auid=query.get("auid"), meta=meta or None,
                                  limit=limit + 1, after=after, newest=order == "newest",
                                  text=query.get("q") or None)
        more = len(found) > limit
        found = found[:limit]
        return 200, {"jobs": [_job_object(r, self.manager.backend.enforced) for r in found],
                     "next": found[-1]["jid"] if more else None}

    def route_events(self, groups, query, body):
        self._only(query, "since", "wait", "limit")
        since = query.get("since")
        if since is not None:
            if not re.fullmatch(r"[0-9]{1,18}", since):
                raise HTTPError(400, "since must be a sequence number (a non-negative integer)")
            since = int(since)
        limit = self._limit(query)
        wait = 0.0
        if "wait" in query:
            try:
                wait = min(float(query["wait"]), self.server.max_wait)
            except ValueError:
                raise HTTPError(400, "wait must be a number of seconds") from None
            if not wait >= 0:
                raise HTTPError(400, "wait must be a number of seconds")
        try:
            return self._events_reply(self.server.event_polls.answer(since, wait, limit))
        except _Parked as parked:
            answer = parked.answer
            parked.answer = lambda: self._events_reply(answer())
            raise

    @staticmethod
    def _events_reply(feed):
        for change in feed["changes"]:
            if change["job"] is not None:
                change["job"] = _job_object(change["job"])
        return 200, feed

    def route_page(self, groups, query, body):
        return 200, _PAGE

    def route_ui(self, groups, query, body):
        return self.route_page(groups, query, body)

    def route_metrics(self, groups, query, body):
        self._only(query)
        return 200, _Encoded(self.server.metrics_text().encode("utf-8"), METRICS_TYPE)

    def route_openapi(self, groups, query, body):
        self._only(query)
        return 200, _Routes.openapi()

    def route_command(self, groups, query, body, verb="POST"):
        self._only(query)
        commands = self.server.commands
        try:
            return 200, (commands.dispatch if verb == "POST" else commands.db_control)(body)
        except PmanError as e:      # the error in the dialect's envelope
            payload = body.get("payload", body)
            if not isinstance(payload, dict):
                payload = {}
            return _status_for(e), {"action": payload.get("action"),
                                    "meta": payload.get("meta"), "path": "/api/v1/cmd",
                                    "RESTverb": verb, "status": False, "message": str(e)}

    def route_command_db(self, groups, query, body):
        return self.route_command(groups, query, body, "PUT")

    def route_logs(self, groups, query, body):
        self._only(query, "stream", "offset", "limit", "raw")
        ints = {}
        for name in ("offset", "limit"):
            if name in query:
                if not re.fullmatch(r"[0-9]{1,18}", query[name]):
                    raise HTTPError(400, "%s must be a non-negative integer" % name)
                ints[name] = int(query[name])
        raw = _flag(query, "raw", False)
        limit = ints.get("limit")
        if raw:     # the decoded form cuts characters at arbitrary offsets
            limit = RAW_CHUNK if limit is None else min(limit, RAW_CHUNK)
        chunk = self.manager.read_log(check_jid(groups["jid"]), query.get("stream", "stdout"),
                                      offset=ints.get("offset", 0), limit=limit)
        if raw:
            return 200, _Encoded(chunk["data"], "application/octet-stream", (
                ("Pman-Offset", chunk["offset"]), ("Pman-Next-Offset", chunk["next_offset"]),
                ("Pman-Eof", "true" if chunk["eof"] else "false")))
        chunk["data"] = str(chunk["data"], "utf-8", "replace")
        return 200, chunk

    def route_kill(self, groups, query, body):
        self._only(query)
        unknown = set(body) - {"signal", "grace"}
        if unknown:
            raise InvalidArgument("unknown field(s) in a kill: %s" % _shown(sorted(unknown)))
        record = self.manager.kill(check_jid(groups["jid"]), body.get("signal", "SIGTERM"),
                                   grace=_number_or_none(body.get("grace"), "grace"))
        return 202, _with_logs(self.manager, record)

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
            if wait > 0 and self.manager.etag(jid) is None:     # still queued or running
                if not self.server.long_polls.acquire(blocking=False):
                    raise HTTPError(503, "too many long polls in progress: try again")
                manager = self.manager

                def ended():
                    try:
                        return manager.etag(jid) is not None
                    except JobNotFound:
                        return True
                raise _Parked(ended, lambda: self._job_reply(jid), _time() + wait,
                              self.server.long_polls.release)
        return self._job_reply(jid)

    def _job_reply(self, jid):
        manager = self.manager
        return 200, _job_object(manager.get(jid, with_logs=True), manager.backend.enforced)

    def route_delete_job(self, groups, query, body):
        self._only(query, "kill")
        self.manager.remove(check_jid(groups["jid"]), kill=_flag(query, "kill", True))
        return 204, None

    def route_walk(self, groups, query, body):
        self._only(query)
        record = _record_by_name(self.manager, groups["jid"])
        parts = [p for p in groups["tree"].split("/") if p]
        value = _walk(job_tree(record, self.manager), parts, "/".join(parts))
        path = "/api/v1/" + "/".join([groups["jid"]] + parts)
        return 200, {"status": True, "path": path,
                     "GET": _wrap([record["jid"]] + parts, value)}

    # -- scheduling ----------------------------------------------------------

    @staticmethod
    def _fields(body, what, *names):
        """The body's fields, each of *names* required and no other."""
        unknown = sorted(set(body) - set(names))
        if unknown:
            raise InvalidArgument("unknown field(s) in %s: %s" % (what, _shown(unknown)))
        for name in names:
            if name not in body:
                raise InvalidArgument("%r is required in %s" % (name, what))
        return [body[name] for name in names]

    def route_groups(self, groups, query, body):
        self._only(query)
        return 200, {"paused": self.manager.paused(), "groups": self.manager.groups()}

    def route_set_group(self, groups, query, body):
        self._only(query)
        limit, = self._fields(body, "a group (null: no limit of its own)", "max_running")
        return 200, self.manager.set_group(groups["name"], max_running=limit)

    def route_pause_group(self, groups, query, body):
        self._only(query)
        self._fields(body, "a pause")
        return 200, self.manager.pause(groups["name"])

    def route_resume_group(self, groups, query, body):
        self._only(query)
        self._fields(body, "a resume")
        return 200, self.manager.resume(groups["name"])

    def route_pause(self, groups, query, body):
        self._only(query)
        self._fields(body, "a pause")
        return 200, {"paused": self.manager.pause()}

    def route_resume(self, groups, query, body):
        self._only(query)
        self._fields(body, "a resume")
        return 200, {"paused": self.manager.resume()}

    def _queued_reply(self, record):
        return 200, _job_object(record, self.manager.backend.enforced)

    def route_hold(self, groups, query, body):
        self._only(query)
        self._fields(body, "a hold")
        return self._queued_reply(self.manager.hold(check_jid(groups["jid"])))

    def route_release(self, groups, query, body):
        self._only(query)
        self._fields(body, "a release")
        return self._queued_reply(self.manager.release(check_jid(groups["jid"])))

    def route_priority(self, groups, query, body):
        self._only(query)
        priority, = self._fields(body, "a priority change", "priority")
        return self._queued_reply(self.manager.set_priority(check_jid(groups["jid"]), priority))


class _Routes:
    """The route table: (method, regex, OpenAPI path, handler, summary), the
    first match wins.  A handler is an _Api method taking (groups, query,
    body) and returning (status, obj); its name without ``route_`` is the
    OpenAPI operationId, which keys BODIES, MEDIA and PARAMETERS."""

    TABLE = [
        ("GET", r"/api/v1", "/api/v1/", _Api.route_root,
         "List every jid (command dialect)"),
        ("POST", r"/api/v1", "/api/v1/", _Api.route_create,
         "Run a job (resource dialect); 201 with the job object, logs included; "
         "unknown fields are ignored and named in ignored_fields"),
        ("GET", r"/api/v1/jobs", "/api/v1/jobs", _Api.route_list_jobs,
         "Paged job list: ?status=&auid=&q=&meta.KEY=&limit=&after=&order=oldest|newest"),
        ("POST", r"/api/v1/jobs", "/api/v1/jobs", _Api.route_create_batch,
         "Run a batch of jobs, all or none: {\"jobs\": [job bodies as for POST /api/v1/]} "
         "-> 201 {\"jobs\": [job objects]}, in order; one fsync for the batch"),
        ("GET", r"/api/v1/events", "/api/v1/events", _Api.route_events,
         "The change feed: ?since=N&wait=S&limit=M long-polls for the jobs changed "
         "after sequence number N (each once, its object as it is now, null once "
         "forgotten, no logs); no since: the current seq and counts"),
        ("GET", r"/api/v1/openapi\.json", "/api/v1/openapi.json", _Api.route_openapi,
         "This OpenAPI document"),
        ("POST", r"/api/v1/cmd", "/api/v1/cmd/", _Api.route_command,
         "The original command dialect: payload.action"),
        ("PUT", r"/api/v1/cmd", "/api/v1/cmd/", _Api.route_command_db,
         "The original's state control: {\"payload\": {\"action\": \"run\", \"meta\": "
         "{\"context\": \"db\", \"operation\": \"save\" or \"load\"}}}, as DBctl"),
        ("GET", r"/api/v1/groups", "/api/v1/groups", _Api.route_groups,
         "Whether the manager is paused, and every group (those set, and those of queued "
         "or running jobs): {\"paused\": bool, \"groups\": [{\"name\", \"max_running\", "
         "\"paused\", \"running\", \"waiting\"}]}"),
        ("PUT", r"/api/v1/groups/(?P<name>[^/]+)", "/api/v1/groups/{name}",
         _Api.route_set_group,
         "Set a group's limit of jobs running at once ({\"max_running\": N}, null: none of "
         "its own; the manager's limit still holds), creating the group; kept across "
         "restarts; 200 with the group"),
        ("POST", r"/api/v1/groups/(?P<name>[^/]+)/pause", "/api/v1/groups/{name}/pause",
         _Api.route_pause_group,
         "Pause a group: none of its jobs starts, running ones go on; kept across "
         "restarts; 200 with the group"),
        ("POST", r"/api/v1/groups/(?P<name>[^/]+)/resume", "/api/v1/groups/{name}/resume",
         _Api.route_resume_group, "Resume a paused group; 200 with the group"),
        ("POST", r"/api/v1/pause", "/api/v1/pause", _Api.route_pause,
         "Pause the manager: no job starts, running ones go on; kept across restarts; "
         "200 {\"paused\": true}"),
        ("POST", r"/api/v1/resume", "/api/v1/resume", _Api.route_resume,
         "Resume the manager; 200 {\"paused\": false}"),
        ("GET", r"/api/v1/(?P<jid>[^/]+)/logs", "/api/v1/{jid}/logs", _Api.route_logs,
         "Read a log stream: ?stream=stdout|stderr&offset=N&limit=M; with &raw=1 the "
         "bytes themselves (application/octet-stream, at most 1 MiB), their offsets and "
         "eof in the Pman-Offset, Pman-Next-Offset and Pman-Eof headers"),
        ("POST", r"/api/v1/(?P<jid>[^/]+)/kill", "/api/v1/{jid}/kill", _Api.route_kill,
         "Signal a job; 202.  After TERM (the default), INT or QUIT, SIGKILL follows "
         "grace seconds later; KILL is final; any other signal (STOP, CONT, USR1...) is "
         "sent once to a running job, never escalated (409 for a queued job)"),
        ("POST", r"/api/v1/(?P<jid>[^/]+)/hold", "/api/v1/{jid}/hold", _Api.route_hold,
         "Hold a queued job: it does not start until released; 200 with the job object, "
         "409 if the job is not queued"),
        ("POST", r"/api/v1/(?P<jid>[^/]+)/release", "/api/v1/{jid}/release",
         _Api.route_release,
         "Release a held job; 200 with the job object, 409 if the job is not queued"),
        ("POST", r"/api/v1/(?P<jid>[^/]+)/priority", "/api/v1/{jid}/priority",
         _Api.route_priority,
         "Change a queued job's priority ({\"priority\": N}, higher first); 200 with the "
         "job object, 409 if the job is not queued"),
        ("GET", r"/api/v1/(?P<jid>[^/]+)", "/api/v1/{jid}/", _Api.route_get_job,
         "A job object; ?wait=S long-polls until it ends"),
        ("DELETE", r"/api/v1/(?P<jid>[^/]+)", "/api/v1/{jid}/", _Api.route_delete_job,
         "Kill if running, forget, remove logs; 204.  ?kill=0: 409 for a queued or "
         "running job instead of killing it"),
        ("GET", r"/api/v1/(?P<jid>[^/]+)/(?P<tree>.+)", "/api/v1/{jid}/{path}",
         _Api.route_walk,
         "A value of the job tree (jid, or _N: _0 the first job, _-1 the last), "
         "wrapped in its path"),
        ("GET", r"", "/", _Api.route_page,
         "The live status page (HTML; served without a token, "
         "holds no data: its API calls need the token)"),
        ("GET", r"/ui", "/ui", _Api.route_ui, "The live status page, as at /"),
        ("GET", r"/metrics", "/metrics", _Api.route_metrics,
         "Prometheus metrics (text format 0.0.4); token rules as the API"),
    ]
    COMPILED = [(m, re.compile(rx + "/?"), p, h, s) for m, rx, p, h, s in TABLE]
    # method -> [(regex, template, handler)], in table order: a request
    # tries only its method's routes (the others only to say what a 405 allows)
    BY_METHOD = {m: [(rx, p, h) for m2, rx, p, h, _ in routes if m2 == m]
                 for routes in (COMPILED,) for m in {r[0] for r in routes}}

    _JID = {"oneOf": [{"type": "string", "pattern": "^/?%s$" % JID_RE.pattern},
                      {"type": "integer", "description": "taken as its decimal string"}]}
    JOB_BODY = {
        "type": "object", "additionalProperties": True,
        "description": "Unknown fields are ignored (as pman 3.x does) and named in "
                       "the reply's ignored_fields.  A jid with a leading / is taken "
                       "without it.  Give cmd, or entrypoint + args, or pman 3.x's "
                       "cmd_args, selfexec, selfpath, execshell.  A body in pfcon's form "
                       "(pman 3.x's fields, or type and number_of_workers without cmd) "
                       "needs every field pman requires; its limits are integers and "
                       "its type one of ds, fs, ts.",
        "properties": dict(
            {"jid": _JID, "cmd": {"type": "string"},
             "entrypoint": {"type": "array", "items": {"type": "string"}},
             "args": {"type": "array", "items": {"type": "string"}},
             "auid": {"type": "string"}, "cwd": {"type": "string"},
             "env": {"oneOf": [{"type": "array", "items": {"type": "string"}},
                               {"type": "object",
                                "additionalProperties": {"type": "string"}}]},
             "timeout": {"type": "number", "minimum": 0}, "meta": {"type": "object"},
             "after": {"type": "array", "items": {"type": "string"},
                       "description": "start once each of these jobs (known, or of the same "
                                      "batch) finished successfully; if one ends otherwise, "
                                      "this job ends finishedWithError without running"},
             "after_any": {"type": "array", "items": {"type": "string"},
                           "description": "start once each of these jobs ended, however"},
             "group": {"type": "string", "pattern": "^%s$" % GROUP_RE.pattern,
                       "default": DEFAULT_GROUP},
             "priority": {"type": "integer", "default": 0,
                          "description": "higher starts first; equal: submission order"},
             "begin": {"oneOf": [{"type": "string", "format": "date-time"},
                                 {"type": "number", "description": "epoch seconds"}],
                       "description": "the earliest start (ISO 8601 with an offset)"},
             "hold": {"type": "boolean", "default": False,
                      "description": "queue it until POST /api/v1/{jid}/release"},
             "retries": {"type": "integer", "minimum": 0, "maximum": MAX_RETRIES,
                         "default": 0},
             "retry_delay": {"type": "number", "minimum": 0, "default": 1,
                             "description": "seconds before the first retry, doubled "
                                            "before each next one"},
             "cpus": {"type": "integer", "minimum": 0, "default": 0,
                      "description": "CPUs of its own (pfcon's cpu_limit, millicores, "
                                     "stands for it when absent)"},
             "memory": {"type": "integer", "minimum": 0, "default": 0,
                        "description": "MiB, enforced where pman can make a cgroup "
                                       "(pfcon's memory_limit stands for it when absent)"},
             "gpus": {"type": "integer", "minimum": 0, "default": 0,
                      "description": "GPUs of its own, in CUDA_VISIBLE_DEVICES (pfcon's "
                                     "gpu_limit stands for it when absent)"}},
            **{name: {"description": "recorded; enforced (and image run) only by the "
                                     "podman backend"} for name in PFCON_FIELDS},
            **{name: {"type": "string", "description": "pman 3.x's command: execshell "
                      "selfpath/selfexec cmd_args (cmd_path_flags: comma-separated)"}
               for name in PMAN3_FIELDS})}
    NO_FIELDS = {"type": "object", "additionalProperties": False, "properties": {},
                 "description": "{}"}
    BODIES = {      # request bodies by handler, for the OpenAPI document
        "create": JOB_BODY,
        "create_batch": {
            "type": "object", "additionalProperties": False, "required": ["jobs"],
            "description": "All or nothing: a bad job (400, its index named) or a jid "
                           "given twice or already active (409) runs none; the batch is "
                           "journaled as one record with one fsync, then started in order.",
            "properties": {"jobs": {"type": "array", "minItems": 1, "maxItems": MAX_BATCH,
                                    "items": JOB_BODY}}},
        "kill": {"type": "object", "additionalProperties": False, "properties": {
            "signal": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
            "grace": {"type": "number", "minimum": 0}}},
        "set_group": {"type": "object", "additionalProperties": False,
                      "required": ["max_running"], "properties": {"max_running": {
                          "type": "integer", "minimum": 1, "nullable": True}}},
        "priority": {"type": "object", "additionalProperties": False, "required": ["priority"],
                     "properties": {"priority": {"type": "integer"}}},
        "pause_group": NO_FIELDS, "resume_group": NO_FIELDS, "pause": NO_FIELDS,
        "resume": NO_FIELDS, "hold": NO_FIELDS, "release": NO_FIELDS,
        "command": {"type": "object", "description": "{\"payload\": {\"action\", "
                    "\"meta\"}} or the payload alone", "properties": {
                        "payload": {"type": "object"},
                        "action": {"type": "string", "enum": list(_CommandDialect.ACTIONS)},
                        "meta": {"type": "object"}}},
        "command_db": {"type": "object", "description": "{\"payload\": {\"action\": "
                       "\"run\", \"meta\": {\"context\": \"db\", \"operation\": "
                       "\"save\" | \"load\"}}} or the payload alone; no dbpath",
                       "properties": {"payload": {"type": "object"},
                                      "action": {"type": "string", "enum": ["run"]},
                                      "meta": {"type": "object"}}},
    }

    MEDIA = {"page": "text/html", "ui": "text/html", "metrics": METRICS_TYPE}
    PARAMETERS = {      # query parameters by handler, where the summary is not enough
        "logs": [
            ("stream", ["stdout", "stderr"], "the stream (default stdout)"),
            ("offset", "integer", "the first byte to read (default 0)"),
            ("limit", "integer", "at most this many bytes"),
            ("raw", ["1", "0", "true", "false"],
             "1: reply with the bytes (application/octet-stream, at most %d), the offsets "
             "and eof in the Pman-Offset, Pman-Next-Offset and Pman-Eof headers" % RAW_CHUNK)],
        "delete_job": [
            ("kill", ["1", "0", "true", "false"],
             "0: a queued or running job is a 409, not killed (default 1)")],
        "get_job": [("wait", "number", "long poll: at most this many seconds (capped)")],
        "events": [
            ("since", "integer", "a seq of an earlier reply; absent: start from now"),
            ("wait", "number", "seconds to wait for a change (at most %g)" % MAX_WAIT),
            ("limit", "integer", "at most this many jobs (1-%d, default %d); "
             "seq is then the last one's" % (MAX_PAGE, PAGE_SIZE))],
        "list_jobs": [
            ("status", "string", "one status, or several separated by commas"),
            ("auid", "string", "this auid only"),
            ("q", "string", "text found, ignoring case, in the jid, cmd, auid or message"),
            ("limit", "integer", "page size, 1-%d (default %d)" % (MAX_PAGE, PAGE_SIZE)),
            ("after", "string", "the next of an earlier page"),
            ("order", "string", "oldest (submission order, the default) or newest")],
    }

    @classmethod
    def openapi(cls):
        paths = {}
        for method, _, path, route, summary in cls.TABLE:
            handler = route.__name__[len("route_"):]
            op = {"summary": summary, "operationId": handler,
                  "responses": {"default": {"description": "JSON object; errors are "
                                            "{\"status\": false, \"message\": ...}"}}}
            media = cls.MEDIA.get(handler)
            if media:
                op["responses"]["200"] = {"description": summary, "content": {media: {}}}
            params = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                      for p in re.findall(r"\{(\w+)\}", path)]
            params += [{"name": n, "in": "query", "required": False,
                        "schema": {"enum": t} if isinstance(t, list) else {"type": t},
                        "description": d} for n, t, d in cls.PARAMETERS.get(handler, ())]
            if params:
                op["parameters"] = params
            if method in _BODY_METHODS:
                op["requestBody"] = {"required": True, "content": {
                    "application/json": {"schema": cls.BODIES.get(handler,
                                                                  {"type": "object"})}}}
            if method in ("POST", "PUT", "DELETE"):
                op["responses"]["507"] = {"description": "Insufficient Storage: the state "
                                          "directory could not record the change (ENOSPC, "
                                          "EIO); nothing was run, signalled or forgotten"}
            paths.setdefault(path, {})[method.lower()] = op
        return {"openapi": "3.0.3",
                "info": {"title": "pman", "version": __version__,
                         "description": "Process manager API: command and resource dialects"},
                "paths": paths}


# ---------------------------------------------------------------------------
# The HTTP server: requests
# ---------------------------------------------------------------------------

class _Headers:
    """A request's header fields, parsed in one pass from the head the reader
    thread already holds: http.server's email parser is most of a small
    request's cost.  Names are case-insensitive and ``get`` gives the first
    value, as with email.message.Message.  Stricter than that parser where
    RFC 9112 lets a server be: a line that is not ``name: value`` (a folded
    line, a space before the colon, no name) is a 400, and more than
    MAX_HEADERS fields a 431."""

    __slots__ = ("_fields",)
    # Linear time (no backtracking between the value and its trailing
    # whitespace); a CR or NUL inside a value makes the line malformed.
    _LINE = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+):([^\r\n\x00]*)\r?")

    def __init__(self, data):
        fields = self._fields = {}      # lower-case name -> [(name, value)]
        lines = data.decode("iso-8859-1").split("\n")
        if len(lines) > MAX_HEADERS + 2:
            raise HTTPError(431, "more than %d header fields" % MAX_HEADERS)
        for line in lines:
            match = self._LINE.fullmatch(line)
            if match is None:
                if line in ("", "\r"):     # the empty line that ends the head
                    break
                raise HTTPError(400, "malformed header line %r" % line[:80])
            name = match.group(1)
            fields.setdefault(name.lower(), []).append((name, match.group(2).strip(" \t")))

    def get(self, name, default=None):
        values = self._fields.get(name.lower())
        return values[0][1] if values else default

    def get_all(self, name, failobj=None):
        values = self._fields.get(name.lower())
        return [value for _, value in values] if values else failobj

    def __contains__(self, name):
        return name.lower() in self._fields


def _http_version(text):
    """(major, minor) of an "HTTP/x.y" request version, or None."""
    name, _, number = text.partition("/")
    major, _, minor = number.partition(".")
    if (name != "HTTP" or not major.isdigit() or not minor.isdigit() or not major.isascii()
            or not minor.isascii() or len(major) > 10 or len(minor) > 10):
        return None
    return int(major), int(minor)


# method SP request-target [SP HTTP-version]: a token, then visible ASCII
# (the version's own checks are _http_version's; no version is HTTP/0.9)
_REQUEST_LINE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+ [!-~]+(?: [!-~]+)?")


def _body_length(fields):
    """The length of the body a request's header *fields* announce, or None
    for none.  What cannot be read safely is refused (HTTPError): chunked
    or encoded bodies, two lengths, a malformed one, one over MAX_BODY."""
    if "Transfer-Encoding" in fields:      # even empty: a front end may differ
        raise HTTPError(411, "chunked or encoded bodies are not supported: "
                        "send Content-Length")
    lengths = fields.get_all("Content-Length")
    if lengths is None:
        return None
    if len(lengths) > 1:
        raise HTTPError(400, "more than one Content-Length header")
    text = lengths[0].strip()
    if not text.isdigit() or not text.isascii():
        raise HTTPError(400, "invalid Content-Length %r" % lengths[0])
    length = int(text)
    if length > MAX_BODY:
        raise HTTPError(413, "body of %d bytes is over the limit of %d" % (length, MAX_BODY))
    return length


# Up to MAX_EMPTY_LINES empty lines, skipped before a request line
_EMPTY_LINES = re.compile(rb"(?:\r?\n){0,%d}" % MAX_EMPTY_LINES)


def _parse_head(head):
    """(request line, fields, body length) of a complete request *head*.
    The fields are a _Headers, or the HTTPError that refuses them; a body
    whose length is refused counts as none, as the handler refuses the
    request and closes the connection."""
    start = _EMPTY_LINES.match(head).end() if head[:1] in (b"\r", b"\n") else 0
    eol = head.find(b"\n", start) + 1
    try:
        fields = _Headers(head[eol:])
        length = _body_length(fields) or 0
    except HTTPError as e:
        fields, length = e, 0
    return head[start:eol], fields, length


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
        self.parked = None          # a long poll waiting for its answer (_Parked)

    def serve(self, line, fields, body):
        """Answer the request read whole by the reader (_Conn.take_request):
        its request *line*, its header *fields* (a _Headers, or the
        HTTPError that refuses them) and its *body*."""
        self.raw_requestline = line
        self.fields, self.body = fields, body
        self._template = None           # the route's, for the metrics
        self.path = ""                  # none yet: a bad request line counts as "other"
        if not self.parse_request():
            return
        if self.command not in _METHODS:
            self.send_error(405, "Unsupported method (%r)" % self.command)
            return
        if self.command == "HEAD":
            self.close_connection = True
        self.answer(lambda: self._route(self.command))

    def parse_request(self):
        """http.server's parse_request (same attributes, same replies to a bad
        request line), with the headers read by _Headers."""
        self.command = None
        self.request_version = self.default_request_version
        self.close_connection = True
        if not self._request_line():
            return False
        try:
            if isinstance(self.fields, HTTPError):
                raise self.fields
            self.headers = self.fields
            # The framing (_parse_head checked the length) comes before
            # anything else, the token too.
            if self.command in _BODY_METHODS and "Content-Length" not in self.headers:
                raise HTTPError(411, "a %s needs a Content-Length header" % self.command)
        except HTTPError as e:
            self.send_error(e.status, str(e))
            return False
        connection = self.headers.get("Connection", "").lower()
        if connection == "close":
            self.close_connection = True
        elif connection == "keep-alive":
            self.close_connection = False
        return True         # (a 100 Continue was the reader's: _Conn.request_end)

    def _request_line(self):
        """Read the request line into command, path, request_version and
        close_connection, as http.server does; False once refused."""
        line = str(self.raw_requestline, "iso-8859-1")
        self.requestline = line[:-2] if line.endswith("\r\n") else line.rstrip("\n")
        # RFC 9112 3: exactly one SP between the parts (no other blank
        # separates: a front end may split the line elsewhere)
        if _REQUEST_LINE.fullmatch(self.requestline) is None:
            self.send_error(400, "Bad request syntax (%r)" % self.requestline)
            return False
        words = self.requestline.split(" ")
        if len(words) == 3:
            version = _http_version(words[2])
            if version is None or version >= (2, 0):
                self.send_error(400, "%s HTTP version (%r)" % (
                    "unsupported" if version else "bad", words[2]))
                return False
            self.close_connection = version < (1, 1)
            self.request_version = words[2]
        elif words[0] != "GET":
            self.send_error(400, "Bad HTTP/0.9 request type (%r)" % words[0])
            return False
        self.command, self.path = words[:2]
        if self.path.startswith("//"):      # as http.server: never an absolute URI
            self.path = "/" + self.path.lstrip("/")
        return True

    # -- replies -------------------------------------------------------------

    def _reply(self, status, obj=None):
        if not isinstance(obj, _Encoded):
            try:
                data = b"" if obj is None else json.dumps(obj, allow_nan=False).encode("utf-8")
            except ValueError:      # NaN or Infinity: never sent (inputs refuse them)
                log.error("a reply to %s held a non-JSON number", self.path.split("?")[0])
                status, data = 500, b'{"status": false, "message": "internal error: ValueError"}'
            obj = _Encoded(data)
        body = obj.data
        head = ["HTTP/1.1 %d %s" % (status, _REASONS.get(status, "")),
                "Server: " + self.server_version,
                "Date: " + email.utils.formatdate(_wall(), usegmt=True)]
        if status != 204:
            head += ["Content-Type: " + obj.content_type, "Content-Length: %d" % len(body)]
            head += ["%s: %s" % header for header in obj.headers]
        self.server.count_request(getattr(self, "command", None), getattr(self, "_template", None)
                                  or _template_of(getattr(self, "path", "")), status)
        if self.close_connection:
            head.append("Connection: close")
        elif self.request_version == "HTTP/1.0":    # kept alive because it asked to be
            head.append("Connection: keep-alive")
        # a client that does not read: request_timeout
        self.connection.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        self.log_request(status, len(body))

    def send_error(self, code, message):
        """A malformed request's reply (a 4xx); the connection closes."""
        self.close_connection = True
        self._reply(code, {"status": False, "message": message})

    def log_message(self, format, *args):
        access_log.info("%s %s", self.address_string(), format % args)

    # -- dispatch ------------------------------------------------------------

    def answer(self, reply, done=None):
        """Write *reply*()'s (status, obj), or the error it raises; *done*
        (a parked long poll's) is called before the write.  A route that
        raises _Parked is answered later, through self.parked."""
        try:
            status, obj = reply()
        except _Parked as parked:
            self.parked = parked
            return
        except Exception as e:
            status, message = _status_for(e), str(e)
            if status == 500:
                log.exception("internal error on %s %s", self.command, self.path.split("?")[0])
                message = "internal error: %s" % type(e).__name__
            obj = {"status": False, "message": message}
        finally:
            if done is not None:
                done()
        try:
            self._reply(status, obj)
        except OSError:
            self.close_connection = True

    def _check_access(self, token=True):
        """The Host check, then (unless *token* is False: the page, which
        holds no data) the bearer token."""
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
        if server.token is not None and token:
            given = self.headers.get("Authorization", "")
            scheme, _, token = given.partition(" ")
            ok = scheme.lower() == "bearer" and hmac.compare_digest(
                token.strip().encode("latin-1", "replace"), server.token)
            if not ok:
                raise HTTPError(401, "missing or wrong bearer token")

    def _route(self, method):
        self._check_access(token=self.path.partition("?")[0] not in _PAGE_PATHS)
        body = _json_object(self.body) if method in _BODY_METHODS else None
        path, query = self._target()
        for regex, template, handler in _Routes.BY_METHOD.get(method, ()):
            match = regex.fullmatch(path)
            if match is None:
                continue
            self._template = template       # for the metrics
            groups = {}
            for key, value in match.groupdict().items():
                try:
                    groups[key] = urllib.parse.unquote(value, errors="strict")
                except UnicodeDecodeError:
                    raise HTTPError(400, "invalid percent-encoding in path") from None
            return handler(self.server.api, groups, query, body)
        allowed = [m for m, regex, _, _, _ in _Routes.COMPILED if regex.fullmatch(path)]
        if allowed:
            raise HTTPError(405, "%s is not allowed here; use %s" % (method, ", ".join(allowed)))
        raise HTTPError(404, "no such route: %s" % path[:200])

    def _target(self):
        """The request target's path and its query as a dict (each name at
        most once)."""
        target = self.path
        if not target.startswith("/"):
            raise HTTPError(400, "the request target must be a path")
        if "?" not in target and "#" not in target:     # the usual case
            return target, {}
        try:
            parts = urllib.parse.urlsplit(target)
        except ValueError:
            raise HTTPError(400, "malformed request target") from None
        try:
            query = urllib.parse.parse_qs(parts.query, keep_blank_values=True,
                                          strict_parsing=True, errors="strict") \
                if parts.query else {}
        except (ValueError, UnicodeDecodeError):
            raise HTTPError(400, "malformed query string") from None
        for key, values in query.items():
            if len(values) > 1:
                raise HTTPError(400, "query parameter %r given more than once" % key)
        return parts.path, {k: v[0] for k, v in query.items()}


# ---------------------------------------------------------------------------
# The HTTP server: connections
# ---------------------------------------------------------------------------

class _Parked(Exception):
    """Raised by a long-poll route with nothing to answer yet.  The
    connection goes back to the server's reader thread, so a waiting client
    holds no thread; once ``ready()`` is true (checked whenever the
    manager's change feed moves) or *deadline* (monotonic) has passed, a
    handler thread writes ``answer()``'s (status, obj) and ``done()``
    releases what the poll held."""

    def __init__(self, ready, answer, deadline, done):
        super().__init__("parked")
        self.ready, self.answer, self.deadline, self.done = ready, answer, deadline, done


class _EventPolls:
    """The long polls of ``GET /api/v1/events``.  At most *cap* wait at
    once; a poll past the cap is answered at once with what there is and
    ``"busy": true`` (poll again after a pause), never refused.  A waiting
    poll is parked (see _Parked): it holds no thread and no listener."""

    def __init__(self, manager, cap):
        self.manager = manager
        self.slots = threading.BoundedSemaphore(cap)
        self.cap = cap
        self.lock = threading.Lock()    # guards waiting
        self.waiting = 0

    def answer(self, since, wait, limit):
        """The feed after *since* now, or raise _Parked to wait for it."""
        manager = self.manager
        feed = manager.changes(since, limit=limit)
        if since is None or feed["changes"] or feed["reset"] or wait <= 0:
            return feed
        if not self.slots.acquire(blocking=False):
            feed["busy"] = True
            return feed
        with self.lock:
            self.waiting += 1

        def done():
            with self.lock:
                self.waiting -= 1
            self.slots.release()
        raise _Parked(lambda: manager._feed_seq > since or manager._closing,
                      lambda: manager.changes(since, limit=limit), _time() + wait, done)


_METHODS = frozenset({"GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"})
_BODY_METHODS = ("POST", "PUT")     # the methods whose requests carry a JSON body


def _template_of(target):
    """The route template a request target falls under, or "other": the
    metrics' labels stay a bounded set whatever clients send."""
    path = target.partition("?")[0]
    if not path.startswith("/"):
        return "other"
    for _, regex, template, _, _ in _Routes.COMPILED:
        if regex.fullmatch(path):
            return template
    return "other"


class _Conn:
    """One client connection: its socket and the bytes received but not yet
    used.  While no request is complete (head and body) it is *parked*:
    the reader thread alone reads it, and no thread is spent on it.  Once a
    request is in, one handler thread owns it until it goes idle again."""

    __slots__ = ("sock", "addr", "buf", "since", "idle_since", "handler", "poller", "timeout",
                 "request")

    def __init__(self, sock, addr):
        self.sock, self.addr = sock, addr
        self.buf = bytearray()
        self.since = None           # when the first byte of the pending request came
        self.idle_since = _time()
        self.handler = None
        self.poller = None          # a handler thread's wait for the next request
        self.timeout = None         # the socket's timeout while a handler owns it
        self.request = None         # the pending request, once its head is in:
                                    # (line, fields, head length, whole length)

    def head_end(self):
        """The length of a complete request head at the start of buf, or -1.
        The head ends at its first empty line, CRLF or bare LF, after its
        request line (which up to MAX_EMPTY_LINES empty lines may precede)."""
        buf = self.buf
        start = _EMPTY_LINES.match(buf).end() if buf[:1] in (b"\r", b"\n") else 0
        crlf = buf.find(b"\n\r\n", start)
        lf = buf.find(b"\n\n", start, crlf + 2 if crlf >= 0 else len(buf))
        end = lf + 2 if lf >= 0 else crlf + 3 if crlf >= 0 else -1
        return end if end <= MAX_HEAD else -1     # too long: never served (431)

    def request_end(self):
        """The length of the request (head and body) complete at the start
        of buf, or -1.  Once the head is in, its body's length is known,
        and a client that asked for it gets its 100 Continue."""
        request = self.request
        if request is None:
            head = self.head_end()
            if head < 0:
                return -1
            line, fields, length = _parse_head(bytes(self.buf[:head]))
            request = self.request = (line, fields, head, head + length)
            # (a refused head counts no body: fields is a _Headers here)
            if (len(self.buf) < head + length and line.rstrip().endswith(b" HTTP/1.1")
                    and fields.get("Expect", "").lower() == "100-continue"):
                try:
                    self.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
                except OSError:
                    pass        # the client sends its body after a pause anyway
        return request[3] if len(self.buf) >= request[3] else -1

    def take_request(self):
        """The complete request at the start of buf (see request_end),
        removed from it: (request line, fields, body)."""
        line, fields, head, end = self.request
        self.request = None
        buf = self.buf
        body = bytes(buf[head:end])
        if end == len(buf):     # the usual case: nothing pipelined behind
            buf.clear()
            self.since = None
        else:
            del buf[:end]
            self.since = _time()
        return line, fields, body

    def next_request(self, linger):
        """Wait up to *linger* s for the whole next request: its length,
        -1 if it is not complete by then, 0 if the client closed.  A busy
        keep-alive client is served by the same thread.  The socket's
        timeout stays as it is (no syscall per request)."""
        if self.buf:
            end = self.request_end()
            if end >= 0:
                return end
        poller = self.poller
        if poller is None:
            poller = self.poller = select.poll()
            poller.register(self.sock, select.POLLIN)
        wait, until = linger * 1000, None
        while (self.request is not None or len(self.buf) <= MAX_HEAD) and poller.poll(wait):
            data = self.sock.recv(65536)
            if not data:
                return 0
            if self.since is None:
                self.since = _time()
            self.buf += data
            end = self.request_end()
            if end >= 0:
                return end
            if until is None:           # a request in pieces: the rest within linger
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


_HEAD_TOO_LARGE = _canned(431, "Request Header Fields Too Large",
                          "the request line and headers exceed %d bytes" % MAX_HEAD)
_BODY_SHORT = _canned(400, "Bad Request", "body shorter than its Content-Length")
_BUSY = _canned(503, "Service Unavailable", "too many requests in progress: try again")
_NO_THREAD = _canned(503, "Service Unavailable", "no thread could be started to serve "
                     "the request: try again")


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


class _AcceptPause:
    """The reader's backoff when accept fails for want of fds (EMFILE,
    ENFILE): stop selecting the listening socket for 50 ms, doubling to 1 s
    while it keeps failing; one warning when it starts, one when it ends."""

    def __init__(self):
        self.until = None       # monotonic time to select the listener again
        self.backoff = 0.0

    def after(self, sel, listener, err):
        """What accepting gave: None, or the errno name that stopped it."""
        if err is not None:
            sel.unregister(listener)
            if not self.backoff:
                log.warning("cannot accept connections (%s): pausing accepts, retrying "
                            "with a backoff", err)
            self.backoff = min(1.0, self.backoff * 2 or 0.05)
            self.until = _time() + self.backoff
        elif self.backoff:
            log.warning("accepting connections again")
            self.backoff = 0.0

    def resume_if_due(self, sel, listener, now):
        if self.until is not None and now >= self.until:
            self.until = None
            sel.register(listener, selectors.EVENT_READ, "accept")


class _Server(http.server.HTTPServer):
    """One reader thread (the one in `serve_forever`) accepts connections
    and reads them with `selectors` until a request, head and body, is
    complete; only then a handler thread (``pman-http``) serves it, and
    keeps serving that connection while its requests follow each other,
    then hands it back.  So slow or idle clients cost no thread.  Bounds: a
    whole request must arrive within ``request_timeout``, idle connections
    close after it, at most ``max_connections`` are open (past it a new one
    gets 503 at once), and at most `listeners` handler threads run (past
    it, and when a thread cannot start, a request gets 503)."""

    request_queue_size = 1024   # socketserver's 5 drops SYNs under a burst
    allow_reuse_address = True

    def __init__(self, address, manager, *, token, loopback, listeners, request_timeout,
                 max_wait, long_polls, max_connections, event_waiters):
        # the options are make_server's, checked there
        self.manager = manager
        self.token = None if token is None else token.encode("ascii")
        self.loopback = loopback
        self.allowed_hosts = {"localhost", "127.0.0.1", "::1", address[0].lower()}
        self.listeners = threading.BoundedSemaphore(listeners)   # one per handler thread
        self.request_timeout = request_timeout
        self.max_wait = max_wait
        self.linger = min(KEEPALIVE_LINGER, request_timeout)
        self.long_polls = threading.BoundedSemaphore(long_polls)
        self.max_connections = max_connections
        self._full_reply = _canned(503, "Service Unavailable", "too many open connections "
                                   "(%d): try again" % max_connections)
        self.commands = _CommandDialect(self)
        self.warned_lock = threading.Lock()     # guards warned_fields and warned_full
        self.warned_fields = set()              # unknown field names already logged
        self.warned_full = False
        self.event_polls = _EventPolls(manager, event_waiters)
        self.metrics_lock = threading.Lock()    # guards requests
        self.requests = collections.Counter()   # (template, method, code) -> n
        self.api = _Api(self)
        super().__init__(address, _Handler)

    def server_activate(self):
        super().server_activate()
        self._parked = {}                   # fd -> _Conn; the reader thread only
        self._returned = collections.deque()    # _Conns handed back by handler threads
        self._waker = _Waker()
        self._open = 0                      # connections open
        self._open_lock = threading.Lock()  # guards _open
        self._polls_lock = threading.Lock()     # guards _polls
        self._polls = []                    # (conn, _Parked): long polls, no thread each
        # (conn, _Parked or None, monotonic time of its 503): requests that
        # wait for a free handler thread, oldest first.  The reader only;
        # handler threads test it to give their listener up early.
        self._waiting = collections.deque()
        self._stop = threading.Event()      # shutdown() asks the reader to stop
        self._stopped = threading.Event()   # the reader has stopped
        self._stopped.set()

    def serve_forever(self, poll_interval=None):
        """Accept and read connections until `shutdown` (*poll_interval* is
        socketserver's, unused: shutdown wakes the loop)."""
        self._stopped.clear()       # _stop stays: a shutdown() asked for already counts
        sel = selectors.DefaultSelector()
        try:
            self.socket.setblocking(False)
            sel.register(self.socket, selectors.EVENT_READ, "accept")
            sel.register(self._waker.r, selectors.EVENT_READ, "wake")
            self.manager._listeners.append(self._feed_moved)
            self._read_until_stopped(sel)
        finally:
            self._close_reader(sel)

    def _read_until_stopped(self, sel):
        """The reader's loop: accept, read parked connections, take back
        those handler threads return, answer long polls that are due, and
        sweep for deadlines."""
        sweep_every = min(0.25, self.request_timeout / 4)
        next_sweep = _time() + sweep_every
        pause = _AcceptPause()
        poll_due = None
        while not self._stop.is_set():
            wait = min(t for t in (next_sweep, pause.until, poll_due) if t is not None)
            if self._waiting:
                wait = min(wait, self._waiting[0][2])
            for key, _ in sel.select(max(0.0, wait - _time())):
                if key.data == "accept":
                    pause.after(sel, self.socket, self._accept(sel))
                elif key.data == "wake":
                    _drain(self._waker.r)
                    while self._returned:
                        self._park(sel, self._returned.popleft())
                else:
                    self._on_readable(sel, key.data)
            for _ in range(len(self._waiting)):     # a listener may be free
                self._start(*self._waiting.popleft())
            now = _time()
            poll_due = self._answer_polls(now)
            pause.resume_if_due(sel, self.socket, now)
            if now >= next_sweep:
                next_sweep = now + sweep_every
                self._sweep(sel, now)

    def _close_reader(self, sel):
        """After the reader's loop: close every connection it holds."""
        try:
            self.manager._listeners.remove(self._feed_moved)
        except ValueError:
            pass
        with self._polls_lock:
            held, self._polls = self._polls, []
        held += [(conn, None) for conn in self._parked.values()]
        held += [(conn, parked) for conn, parked, _ in self._waiting]
        self._parked.clear()
        self._waiting.clear()
        for conn, parked in held:
            if parked is not None:
                parked.done()
            self._drop(conn)
        sel.close()
        self._stop.clear()          # a later serve_forever() serves again
        self._stopped.set()

    def shutdown(self):
        """Stop `serve_forever` and wait until it has returned."""
        self._stop.set()
        self._waker.wake()
        self._stopped.wait()

    def server_close(self):
        super().server_close()
        if hasattr(self, "_waker"):     # not if the bind failed: never activated
            self._waker.close()

    def _feed_moved(self):
        """A job's record changed (called under the manager's lock): wake
        the reader to re-check the parked long polls, if any.  A poll parked
        after this check is checked when its handler hands it over."""
        if self._polls:
            self._waker.wake()

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
        if conn.buf and conn.request_end() >= 0:    # handed back with one pipelined
            self._start(conn)
            return
        if conn.request is None and len(conn.buf) > MAX_HEAD:     # handed back with no head
            self._drop(conn, _HEAD_TOO_LARGE)
            return
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
            self._drop(conn, None if conn.request is None else _BODY_SHORT)
            return
        if conn.since is None:
            conn.since = _time()
        conn.buf += data
        end = conn.request_end()
        if end < 0 and (conn.request is not None or len(conn.buf) <= MAX_HEAD):
            return
        self._unpark(sel, conn)
        if end < 0:
            self._drop(conn, _HEAD_TOO_LARGE)
            return
        self._start(conn)

    def _start(self, conn, parked=None, due=None):
        """Serve *conn*'s complete request (or answer its *parked* long
        poll) in a handler thread.  With all `listeners` taken it waits in
        _waiting until *due* (LISTENER_WAIT from now), then gets 503; a
        thread that cannot start, 503 at once."""
        if not self.listeners.acquire(blocking=False):
            now = _time()
            if due is None or now < due:
                self._waiting.append((conn, parked, now + LISTENER_WAIT if due is None else due))
                return
            reply = _BUSY
        else:
            try:
                threading.Thread(target=self._serve_conn, args=(conn, parked),
                                 name="pman-http", daemon=True).start()
                return
            except RuntimeError as e:       # out of memory or of tasks (pids, ulimit -u)
                self.listeners.release()
                log.warning("cannot start a handler thread (%s): answering 503", e)
                reply = _NO_THREAD
        if parked is not None:
            parked.done()
        self._drop(conn, reply)

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

    def _serve_conn(self, conn, parked=None):
        """Serve requests on *conn* while they come back to back (first the
        answer of its *parked* long poll, if any); then hand it back to the
        reader (or close it).  Holds a listener, taken by _start."""
        try:
            self._serve_requests(conn, parked)
        finally:
            self.listeners.release()
            if self._waiting:
                self._waker.wake()

    def _serve_requests(self, conn, parked):
        try:
            if conn.handler is None:
                conn.handler = _Handler(conn, self)
                conn.timeout = self.request_timeout
            conn.sock.settimeout(conn.timeout)     # blocking, bounded, until parked again
            handler = conn.handler
            while True:
                if parked is not None:
                    handler.answer(parked.answer, parked.done)
                    parked = None
                else:
                    handler.serve(*conn.take_request())
                    if handler.parked is not None:  # a long poll: no thread while it waits
                        with self._polls_lock:
                            self._polls.append((conn, handler.parked))
                        handler.parked = None
                        self._waker.wake()
                        return
                if handler.close_connection or self._stop.is_set():
                    break
                # linger for the next request, unless another waits for the listener
                end = -1 if self._waiting else conn.next_request(self.linger)
                if end < 0:                 # idle, or a slow next request
                    self._returned.append(conn)
                    self._waker.wake()
                    return
                if end == 0:                # the client closed
                    break
        except Exception:
            log.debug("connection from %s failed", conn.addr, exc_info=True)
        self._drop(conn)

    def _answer_polls(self, now):
        """Hand the parked long polls that are ready or due to handler
        threads; return when the next one is due (or None).  Reader only."""
        with self._polls_lock:
            if not self._polls:
                return None
            due, waiting = [], []
            for item in self._polls:
                parked = item[1]
                try:
                    ready = parked.deadline <= now or parked.ready()
                except Exception:
                    log.exception("checking a long poll failed: answering it now")
                    ready = True
                (due if ready else waiting).append(item)
            self._polls = waiting
            first = min((p.deadline for _, p in waiting), default=None)
        for conn, parked in due:
            self._start(conn, parked)
        return first

    def stop_soon(self):
        threading.Thread(target=self.shutdown, name="pman-http-stop", daemon=True).start()

    def count_request(self, method, template, status):
        key = (template, method if method in _METHODS else "other", status)
        with self.metrics_lock:
            self.requests[key] += 1

    def metrics_text(self):
        """/metrics in the Prometheus text format (0.0.4)."""
        manager = self.manager
        stats = manager.stats()
        lag = stats["reaper_lag"]
        with self.metrics_lock:
            requests = sorted(self.requests.items())
        # Why each queued job waits, by one scan: a scrape may scan the
        # queue, an event never does.
        with manager._lock:
            sched = manager._sched
            waiting = collections.Counter((job.get("group"), sched.reason(job)[0])
                                          for job in sched.queue.values())
            groups, paused = sched.groups(), sched.paused
        metrics = (     # name, type, help, [(name suffix, labels, value)]
            ("pman_build_info", "gauge", "pman's version (the value is 1)",
             [("", {"version": __version__, "python": platform.python_version(),
                    "backend": manager.backend.name}, 1)]),
            ("pman_jobs", "gauge", "Jobs in the state, by status",
             [("", {"status": s}, n) for s, n in manager.counts().items()]),
            ("pman_jobs_waiting", "gauge",
             "Queued jobs by group and by why they wait (%s)" % ", ".join(METRIC_REASONS),
             [("", {"group": g["name"], "reason": r}, waiting[g["name"], r])
              for g in groups for r in METRIC_REASONS]),
            ("pman_group_max_running", "gauge",
             "A group's limit of jobs running at once (none: no limit of its own)",
             [("", {"group": g["name"]}, g["max_running"]) for g in groups
              if g["max_running"] is not None]),
            ("pman_group_paused", "gauge", "1 while a group is paused",
             [("", {"group": g["name"]}, int(g["paused"])) for g in groups]),
            ("pman_group_running", "gauge", "A group's jobs running (or being started)",
             [("", {"group": g["name"]}, g["running"]) for g in groups]),
            ("pman_paused", "gauge", "1 while the manager is paused",
             [("", {}, int(paused))]),
            ("pman_jobs_started_total", "counter", "Jobs started since the manager opened",
             [("", {}, stats["started"])]),
            ("pman_jobs_finished_total", "counter",
             "Jobs ended since the manager opened, by outcome",
             [("", {"status": s}, n) for s, n in stats["ended"].items()]),
            ("pman_jobs_cpu_seconds_total", "counter",
             "CPU time of the jobs ended since the manager opened, by mode (their usage)",
             [("", {"mode": mode}, float(n)) for mode, n in stats["cpu_seconds"].items()]),
            ("pman_spawn_failures_total", "counter",
             "Jobs that could not be spawned (or submitted) since the manager opened",
             [("", {}, stats["spawn_failed"])]),
            ("pman_http_requests_total", "counter",
             "HTTP requests answered, by route template (other: no route), method and code",
             [("", {"route": r, "method": m, "code": c}, n) for (r, m, c), n in requests]),
            ("pman_event_polls_waiting", "gauge",
             "Long polls of /api/v1/events waiting now (at most pman_event_polls_cap)",
             [("", {}, self.event_polls.waiting)]),
            ("pman_event_polls_cap", "gauge", "The cap of waiting event polls",
             [("", {}, self.event_polls.cap)]),
            ("pman_reaper_lag_seconds", "histogram",
             "From the reaper's wake-up for a job's exit to the job's record",
             [("_bucket", {"le": "+Inf" if bound == math.inf else repr(bound)}, n)
              for bound, n in lag["buckets"]]
             + [("_sum", {}, float(lag["sum"])), ("_count", {}, lag["count"])]),
        )
        out = []
        for name, kind, text, samples in metrics:
            out += ["# HELP %s %s." % (name, text), "# TYPE %s %s" % (name, kind)]
            for suffix, labels, value in samples:
                labels = ",".join('%s="%s"' % (k, str(v).replace("\\", "\\\\").replace(
                    '"', '\\"').replace("\n", "\\n")) for k, v in labels.items())
                out.append("%s%s%s %s" % (name, suffix, labels and "{%s}" % labels,
                                          repr(value) if isinstance(value, float) else value))
        return "\n".join(out) + "\n"

    def note_ignored(self, names):
        """Log each unknown field name of a job submission once, at warning
        level.  At most MAX_WARNED_FIELDS names are remembered (a client
        can invent any number); past that, one warning says so."""
        with self.warned_lock:
            new = [n for n in names if n not in self.warned_fields]
            room = max(0, MAX_WARNED_FIELDS - len(self.warned_fields))
            fresh = new[:room]
            self.warned_fields.update(fresh)
            full = len(new) > room and not self.warned_full
            self.warned_full = self.warned_full or full
        for name in fresh:
            log.warning("job submission with unknown field %s: ignored (as pman 3.x does)",
                        _shown(name))
        if full:
            log.warning("more than %d different unknown fields seen: no more are logged",
                        MAX_WARNED_FIELDS)


class _Server6(_Server):
    address_family = socket.AF_INET6


def make_server(manager, host="127.0.0.1", port=5010, *, token=None,
                listeners=DEFAULT_LISTENERS, insecure_no_token=False,
                request_timeout=REQUEST_TIMEOUT, max_wait=MAX_WAIT,
                long_polls=DEFAULT_LONG_POLLS, max_connections=None,
                event_waiters=EVENT_WAITERS):
    """An HTTP server for *manager*, bound but not yet serving: call its
    ``serve_forever()`` (in a thread if you like) and ``shutdown()``.

    A non-loopback *host* needs a *token* (clients send ``Authorization:
    Bearer <token>``) unless ``insecure_no_token=True``.  While bound to
    loopback, requests naming a foreign Host are refused (403).

    *request_timeout* (s) bounds the arrival of a whole request and the idle
    time of a kept-alive connection; *listeners* the handler threads, so the
    requests processed at once; *long_polls* the ``?wait`` requests waiting
    at once; past either, 503.  *max_wait* (s) caps every long poll's wait
    (a job's ``?wait`` and the events feed's).  *max_connections* defaults
    to the soft ``RLIMIT_NOFILE`` less FD_RESERVE and one fd per job slot
    (``max_running``, or half the limit when it is unlimited): past it a new
    connection gets 503 at once.  At most *event_waiters* long polls of
    /api/v1/events wait at once; past that one is answered at once
    (``"busy": true``)."""
    if token is not None:
        if not isinstance(token, str) or not token or not token.isascii():
            raise InvalidArgument("the token must be a non-empty ASCII string")
    loopback = _is_loopback(host)
    if not loopback and token is None and not insecure_no_token:
        raise PmanError("refusing to serve on non-loopback address %s without a token: "
                        "give --token/--token-file (or PMAN_TOKEN), or --insecure-no-token "
                        "to serve anyway" % host)
    for name, value in (("listeners", listeners), ("event_waiters", event_waiters)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgument("%s must be a positive integer" % name)
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
    return (_Server6 if ":" in host else _Server)(
        (host.strip("[]"), port), manager, token=token, loopback=loopback, listeners=listeners,
        request_timeout=request_timeout, max_wait=max_wait, long_polls=long_polls,
        max_connections=max_connections, event_waiters=event_waiters)


# ---------------------------------------------------------------------------
# The command line: the server
# ---------------------------------------------------------------------------

# `pman serve` is the server, and so is `pman` followed by an option (but
# --help), as the original's command line was (`pman --raw 1 --http --port
# 5010 --listeners 12`).  `pman` alone shows the queue, as pueue and
# task-spooler do.  Every other subcommand is a client speaking HTTP to
# --url, so the command line and curl see the same server.

DEFAULT_URL = "http://127.0.0.1:5010"
CLIENT_TIMEOUT = 30.0       # seconds a reply may take, beyond a long poll's wait
CLIENT_IDLE = 5.0           # reconnect after this idle time (the server drops idle ones)
CLIENT_WAIT = 30.0          # seconds per long poll of a waiting client
FOLLOW_POLL = (0.02, 0.25)  # a log follower's sleep when nothing is new: first, largest
PROGRESS_EVERY = 0.5        # seconds between updates of wait's progress line
START_TIMEOUT = 10.0        # seconds --start-server waits for the server to answer
STOP_TIMEOUT = 30.0         # seconds shutdown waits for the server to stop answering

# Exit statuses: one table, README.rst "Exit statuses".  2 is wait's
# timeout, so a usage error is 64 (EX_USAGE), not argparse's 2.
EXIT_OK = 0
EXIT_FAILED = 1             # a job failed, ended undefined, or has no exit code
EXIT_TIMEOUT = 2            # wait --timeout passed
EXIT_SERVER = 3             # no server, an error reply, or (serve) it cannot start
EXIT_USAGE = 64
EXIT_INTERRUPTED = 130      # Ctrl-C, as a shell reports SIGINT


class _ClientError(PmanError):
    """A client command that cannot go on.  Attributes: ``code``, its exit
    status; ``http_status``, the server's reply status (None if there was
    no reply)."""

    def __init__(self, message, code=EXIT_SERVER, http_status=None):
        super().__init__(message)
        self.code = code
        self.http_status = http_status


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error exits 64: its own 2 is wait's timeout."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, "%s: error: %s\n" % (self.prog, message))


def _serve_parser(prog="pman"):
    p = _Parser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve a pman job manager over HTTP (both the original command "
        "dialect and the resource dialect under /api/v1).",
        epilog="example:\n  %s --port 5010 --max-running 4 &\n  pman shutdown"
        "                 # stops it; running jobs keep running\n\n"
        "the client's commands: pman --help" % prog)
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
    p.add_argument("--cpus", type=_cpus_arg, default=None, metavar="N|IDS",
                   help="the CPUs jobs' requests are admitted against: a number, or core "
                   "ids (0,2-3) (default: this process's affinity)")
    p.add_argument("--memory", type=_mib_arg, default=None, metavar="SIZE",
                   help="the memory they are admitted against, in MiB or with a unit (64G) "
                   "(default: the machine's, or its cgroup's limit)")
    p.add_argument("--gpus", type=_gpus_arg, default=None, metavar="IDS",
                   help="the GPU ids to give out (0,1; 'none') (default: "
                   "CUDA_VISIBLE_DEVICES, else nvidia-smi -L)")
    p.add_argument("--grace", type=float, default=DEFAULT_GRACE,
                   help="seconds from a kill's signal to SIGKILL (default 5)")
    p.add_argument("--log-limit", type=int, default=None,
                   help="kill a job whose stdout or stderr passes N bytes")
    p.add_argument("--keep-finished", type=int, default=None,
                   help="forget the oldest finished jobs past N")
    p.add_argument("--backend", choices=("local", "slurm", "podman"), default="local",
                   help="where jobs run: this machine (default), a SLURM cluster, or "
                   "containers of this machine's podman")
    p.add_argument("--slurm-partition", default=None,
                   help="with --backend slurm: the partition to submit to")
    p.add_argument("--sbatch-args", default="",
                   help="with --backend slurm: extra sbatch arguments, one shell-quoted "
                   "string, e.g. \"--qos=long --account=lab\" (a single option needs "
                   "the = form: --sbatch-args=--qos=long)")
    p.add_argument("--podman-runtime", default=None,
                   help="with --backend podman: podman's --runtime (default: podman's own), "
                   "e.g. runc")
    p.add_argument("--podman-args", default="",
                   help="with --backend podman: extra 'podman run' options, one shell-quoted "
                   "string, e.g. \"--ulimit nofile=1024:1024 --network=none\" (a single "
                   "option needs the = form: --podman-args=--network=none)")
    p.add_argument("--storebase", default=None,
                   help="with --backend podman: the directory input_dir and output_dir are "
                   "relative to (mounted at /share/incoming, read-only, and /share/outgoing)")
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
                   help="log more: -v one line per request (logger pman.access), -vv debug")
    p.add_argument("-q", "--quiet", action="store_true", help="log only errors")
    p.add_argument("--log-file", default=None, help="log to this file instead of stderr")
    p.add_argument("--version", action="version", version="pman " + __version__)
    return p


def _read_token(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError as e:
        raise PmanError("cannot read the token file %s: %s" % (path, e.strerror)) from None


def _serve(argv, prog="pman"):
    """``pman [serve] [--port 5010] ...``: see `_serve_until_stopped`."""
    args = _serve_parser(prog).parse_args(argv)
    level = logging.ERROR if args.quiet else (
        logging.INFO, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, filename=args.log_file,
                        format="%(asctime)s pman %(levelname)s %(message)s")
    access_log.setLevel(logging.DEBUG if args.verbose and not args.quiet else logging.WARNING)
    # Taken out of the environment: every job inherits it (its copy, SLURM's
    # export), and the token controls every job.
    token = os.environ.pop("PMAN_TOKEN", None)
    token = args.token or token or None
    _fd_limit(raise_soft=True)      # connections and jobs' pidfds: see make_server
    manager = None
    try:
        if args.token_file:
            token = _read_token(args.token_file)
        backend = "local"
        if args.backend == "slurm":
            backend = SlurmBackend(args.slurm_partition, args.sbatch_args)
        elif args.backend == "podman":
            backend = PodmanBackend(args.podman_runtime, args.podman_args, args.storebase)
        manager = JobManager(args.state_dir, max_running=args.max_running, grace=args.grace,
                             log_limit=args.log_limit, keep_finished=args.keep_finished,
                             backend=backend, cpus=args.cpus, memory=args.memory,
                             gpus=args.gpus)
        server = make_server(manager, args.host, args.port, token=token,
                             listeners=args.listeners,
                             insecure_no_token=args.insecure_no_token,
                             request_timeout=args.request_timeout,
                             max_connections=args.max_connections)
    except (PmanError, OSError) as e:
        if manager is not None:
            manager.close()
        print("pman: %s" % e, file=sys.stderr)
        return EXIT_SERVER
    _serve_until_stopped(server, manager, kill=args.kill_on_exit)
    return EXIT_OK


def _serve_until_stopped(server, manager, kill=False):
    """Serve until SIGTERM or SIGINT (handled only in the main thread, and
    restored once the state is flushed), ``quit`` or a shutdown; then close."""
    previous = {}
    try:
        if threading.current_thread() is threading.main_thread():
            def stop(signum, frame):
                log.info("%s received, stopping", signal_name(signum))
                server.stop_soon()

            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, stop)
        host, port = server.server_address[:2]
        log.info("pman %s serving http://%s:%d/api/v1/ (state: %s)", __version__,
                 host if ":" not in host else "[%s]" % host, port, manager.state_dir)
        server.serve_forever()
    finally:
        try:
            _close_served(server, manager, kill)
        finally:
            for sig, handler in previous.items():
                if handler is not None:
                    signal.signal(sig, handler)


def _close_served(server, manager, kill=False):
    """Close *server*, then *manager*, flushing the state (*kill*: jobs too)."""
    server.server_close()
    manager.close(kill=kill)
    log.info("pman stopped; state flushed to %s", manager.state_dir)


# ---------------------------------------------------------------------------
# The command line: the client
# ---------------------------------------------------------------------------

class _Client:
    """One keep-alive HTTP connection to a pman server's /api/v1.  Every
    failure is a _ClientError whose message is one line for a person."""

    def __init__(self, url, token=None, start_server=False):
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise _ClientError("invalid --url %r: %s" % (url, e), EXIT_USAGE) from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _ClientError("invalid --url %r: give http://HOST:PORT" % url, EXIT_USAGE)
        self.url = url
        self.https = parts.scheme == "https"
        self.host = parts.hostname
        self.port = port or (443 if self.https else 80)
        prefix = parts.path.rstrip("/")
        if prefix.endswith("/api/v1"):
            prefix = prefix[:-len("/api/v1")]
        self.base = prefix + "/api/v1"
        self.token = token
        self.start_server = start_server
        self._conn = None
        self._last = 0.0

    def close(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connect(self, timeout):
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=timeout)
        try:
            conn.connect()
        except OSError as e:
            conn.close()
            if self.start_server and _is_loopback(self.host) and not self.https:
                self.start_server = False       # once
                self._spawn_server()
                return self._connect(timeout)
            reason = e.strerror or str(e) or type(e).__name__
            raise _ClientError(
                "nothing answers at %s (%s): start a server with `pman serve --port %d &`"
                " (or give run --start-server), or point --url / PMAN_URL at yours"
                % (self.url, reason.lower(), self.port)) from None
        return conn

    def _spawn_server(self):
        """task-spooler's first use: start `pman serve` on this loopback
        port in the background (its own session, cwd /, log in the state
        directory) and wait until it answers."""
        state = os.path.abspath(default_state_dir())
        os.makedirs(state, mode=0o700, exist_ok=True)
        log_path = os.path.join(state, "server.log")
        argv = [sys.executable, os.path.abspath(__file__), "serve", "--host", self.host,
                "--port", str(self.port), "--state-dir", state]
        # The token goes through a pipe, not the environment, which the
        # server's /proc/PID/environ shows for its whole life.
        env = {k: v for k, v in os.environ.items() if k != "PMAN_TOKEN"}
        r, w = os.pipe() if self.token is not None else (None, None)
        if r is not None:
            argv += ["--token-file", "/dev/fd/%d" % r]
        try:
            with open(log_path, "ab") as out:
                child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         cwd="/", env=env, start_new_session=True,
                                         pass_fds=() if r is None else (r,))
        except BaseException:
            if w is not None:
                os.close(w)
            raise
        finally:
            if r is not None:
                os.close(r)
        if w is not None:
            try:
                with open(w, "wb") as pipe:
                    pipe.write(self.token.encode("utf-8"))
            except BrokenPipeError:
                pass        # it exited: said below
        deadline = _time() + START_TIMEOUT
        while True:
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
                break
            except OSError:
                pass
            code = child.poll()
            if code is not None or _time() > deadline:
                raise _ClientError("could not start a server on port %d (%s): see %s" % (
                    self.port, "it exited with %d" % code if code is not None
                    else "no answer within %g s" % START_TIMEOUT, log_path))
            _sleep(0.02)
        child.returncode = 0    # it lives on: no "still running" warning at exit
        print("pman: started a server at %s (pid %d, state %s, log %s)"
              % (self.url, child.pid, state, log_path), file=sys.stderr)

    def request(self, method, path, *, query=None, body=None, expect=(200,), wait=0.0):
        """(status, headers, body bytes) of one request to /api/v1 + *path*,
        on the kept-alive connection or a new one; an unexpected status
        raises _ClientError with the server's message.  *wait* is how long
        the server may legitimately hold the reply."""
        target = self.base + path
        if query:
            target += "?" + urllib.parse.urlencode(query)
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self.token is not None:
            headers["Authorization"] = "Bearer " + self.token
        timeout = CLIENT_TIMEOUT + wait
        for attempt in (1, 2):
            fresh = (self._conn is None or self._conn.sock is None
                     or _time() - self._last > CLIENT_IDLE)
            if fresh:
                self.close()
                self._conn = self._connect(timeout)
            try:
                self._conn.sock.settimeout(timeout)
                self._conn.request(method, target, body=data, headers=headers)
                reply = self._conn.getresponse()
                payload = reply.read()
            except socket.timeout:
                self.close()
                raise _ClientError("no reply from %s within %g s" % (self.url, timeout)) from None
            except (OSError, http.client.HTTPException) as e:
                self.close()
                # A kept-alive connection the server closed meanwhile: once
                # more on a new one, unless a POST may already have acted.
                if not fresh and attempt == 1 and method != "POST":
                    continue
                raise _ClientError("the connection to %s failed: %s"
                                   % (self.url, str(e) or type(e).__name__)) from None
            break
        self._last = _time()
        if reply.will_close:
            self.close()
        if reply.status not in expect:
            raise self._refusal(reply, payload)
        return reply.status, reply.headers, payload

    @staticmethod
    def _refusal(reply, payload):
        """The _ClientError of an unexpected status: the server's message."""
        message = None
        try:
            message = json.loads(payload.decode("utf-8")).get("message")
        except (ValueError, AttributeError):
            pass
        if not isinstance(message, str):
            message = payload[:200].decode("utf-8", "replace").strip() or reply.reason
        return _ClientError("%s (HTTP %d)" % (message, reply.status),
                            http_status=reply.status)

    def json(self, method, path, **options):
        _, _, payload = self.request(method, path, **options)
        try:
            obj = json.loads(payload.decode("utf-8"))
        except ValueError:
            raise _ClientError("%s answered something that is not JSON: %r"
                               % (self.url, payload[:100])) from None
        if not isinstance(obj, (dict, list)):
            raise _ClientError("%s answered an unexpected reply: %r" % (self.url, obj))
        return obj

    def job(self, jid, wait=None):
        """The job object; with *wait*, long-polled for up to that long."""
        query = None if wait is None else {"wait": "%.3f" % wait}
        return self.json("GET", "/%s/" % jid, query=query, wait=wait or 0.0)

    def log_chunk(self, jid, stream, offset):
        """(bytes, next_offset, eof) of one raw read from *offset*."""
        _, headers, data = self.request("GET", "/%s/logs" % jid, query={
            "stream": stream, "offset": offset, "limit": RAW_CHUNK, "raw": 1})
        try:
            start, end = int(headers["Pman-Offset"]), int(headers["Pman-Next-Offset"])
            eof = headers["Pman-Eof"] == "true"
        except (KeyError, TypeError, ValueError):
            raise _ClientError("%s does not serve raw logs (an older pman?)" % self.url) from None
        if start != offset or end - start != len(data):
            raise _ClientError("%s answered bytes %d-%d for offset %d with %d bytes"
                               % (self.url, start, end, offset, len(data)))
        return data, end, eof


def _exit_with_job(job):
    """The exit status a shell would give for *job* (128+N for signal N);
    one that has none (undefined, spawn failure, cancelled) is a failure."""
    rc = job.get("returncode")
    if isinstance(rc, bool) or not isinstance(rc, int):
        print("pman: job %s has no exit code: %s (%s)" % (job["jid"], job["status"],
                                                          job.get("message", "")),
              file=sys.stderr)
        return EXIT_FAILED
    if rc < 0:
        return 128 - rc
    return rc if rc <= 255 else EXIT_FAILED


def _follow(client, jid, streams, offset=0):
    """Copy the bytes of *streams* (names -> binary files) of job *jid*
    until the job has ended and every stream is read to its end."""
    offsets = dict.fromkeys(streams, offset)
    pending = list(streams)
    delay = FOLLOW_POLL[0]
    while pending:
        moved = False
        for name in list(pending):
            data, offsets[name], eof = client.log_chunk(jid, name, offsets[name])
            if data:
                streams[name].write(data)
                streams[name].flush()
                moved = True
            if eof:
                pending.remove(name)
        if moved or not pending:
            delay = FOLLOW_POLL[0]
        else:
            _sleep(delay)
            delay = min(delay * 2, FOLLOW_POLL[1])


def _key_values(pairs, what):
    out = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise _ClientError("%s must be KEY=VALUE, not %r" % (what, pair), EXIT_USAGE)
        out[key] = value
    return out


def _checked_jids(jids):
    for jid in jids:
        try:
            check_jid(jid)
        except InvalidArgument as e:
            raise _ClientError(str(e), EXIT_USAGE) from None
    return jids


def _print_json(obj):
    # One line: indent= would take the pure-Python encoder, too slow for
    # `ls --all --json` of many jobs; `| python3 -m json.tool` indents it.
    sys.stdout.write(json.dumps(obj) + "\n")


# ---------------------------------------------------------------------------
# The command line: commands
# ---------------------------------------------------------------------------

def _cmd_run(client, args):
    if not args.command and args.entrypoint is None:
        raise _ClientError("give the command after --, e.g. pman run -- make test", EXIT_USAGE)
    return _submitted(client, args, _run_body(client, args))


def _submitted(client, args, body):
    """Submit *body* (run, restart), then print the jid, follow the job or
    wait for it as *args* say; return the exit status."""
    if args.follow and (args.json or args.wait):
        raise _ClientError("--follow already waits; it prints the job's output, not JSON",
                           EXIT_USAGE)
    try:
        job = client.json("POST", "/", body=body, expect=(201,))
    except _ClientError as e:
        if "'image' is required" not in str(e):
            raise
        raise _ClientError("%s; give it as pman run --image IMAGE -- CMD" % e, e.code,
                           e.http_status) from None
    jid = job["jid"]
    lost = sorted(set(job.get("ignored_fields") or ()) & set(body))
    if lost:            # a server that predates scheduling queues it as a plain job
        raise _ClientError("%s ignored %s (an older pman?): job %s was submitted without "
                           "them" % (client.url, ", ".join(lost), jid))
    if args.follow:
        try:
            _follow(client, jid, {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer})
        except KeyboardInterrupt:
            print("\npman: stopped following %s; it keeps running (pman kill %s)"
                  % (jid, jid), file=sys.stderr)
            return EXIT_INTERRUPTED
        return _exit_with_job(client.job(jid))
    if not args.json:
        print(jid, flush=True)
        if not args.wait and sys.stdout.isatty() and sys.stderr.isatty():
            print("pman: follow it with: pman logs -f %s   (pman show %s, pman wait %s)"
                  % (jid, jid, jid), file=sys.stderr)
    while args.wait and job["status"] in ACTIVE:
        job = client.job(jid, wait=CLIENT_WAIT)
    if args.json:
        _print_json(job)
    return _exit_with_job(job) if args.wait else EXIT_OK


def _run_body(client, args):
    """The POST body of `pman run` *args*."""
    command = args.command
    body = {}
    if args.entrypoint is not None:
        body["entrypoint"], body["args"] = [args.entrypoint], command
    elif len(command) == 1:
        body["cmd"] = command[0]                # one string: a shell command
    else:
        body["entrypoint"], body["args"] = command[:1], command[1:]
    if args.jid is not None:
        body["jid"] = _checked_jids([args.jid])[0]
    if args.auid is not None:
        body["auid"] = args.auid
    env = _env_arg(args.env, args.env_from_client)
    if env:
        body["env"] = ["%s=%s" % pair for pair in env.items()]
    for name in _RUN_PFCON:
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    meta = _key_values(args.meta, "--meta")
    if meta:
        body["meta"] = meta
    if args.cwd is not None:
        body["cwd"] = os.path.abspath(args.cwd)
    elif _is_loopback(client.host) and args.image is None:  # a container: the image's
        try:
            body["cwd"] = os.getcwd()   # where the user is, as with tsp and pueue
        except OSError:
            pass                        # removed under us: the server's
    if args.timeout is not None:
        body["timeout"] = args.timeout
    for name in ("after", "after_any"):
        jids = [j for value in getattr(args, name) or () for j in value.split(",") if j]
        if jids:
            body[name] = _checked_jids(list(dict.fromkeys(jids)))
    for name in ("group", "priority", "retries", "retry_delay", "cpus", "memory", "gpus"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    if args.begin is not None:
        body["begin"] = _begin_arg(args.begin)
    if args.hold:
        body["hold"] = True
    return body


_SIZE_RE = re.compile(r"(\d+)([KMGT]?)(?:i?B)?", re.I)


def _mib_arg(text):
    """A memory size for the command line: MiB, or a number with K, M, G or
    T (powers of 1024; 512M, 4G, 1.5 is refused): whole MiB."""
    match = _SIZE_RE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError("%r is not a size: give MiB (512) or a whole number "
                                         "with K, M, G or T (512M, 4G)" % text)
    number, unit = int(match.group(1)), match.group(2).upper()
    kib = number * 1024 ** "KMGT".index(unit or "M")
    if kib % 1024 or kib == 0:
        raise argparse.ArgumentTypeError("%r is not a positive whole number of MiB" % text)
    return kib // 1024


def _count_arg(text):
    if not text.isdigit():
        raise argparse.ArgumentTypeError("%r is not a whole number" % text)
    return int(text)


def _cpus_arg(text):
    """`serve --cpus`: a number of CPUs, or core ids as 0,2-3."""
    if text.isdigit():
        return int(text)
    cores = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise argparse.ArgumentTypeError("%r is neither a number of CPUs nor core ids "
                                             "(0,2-3)" % text)
        cores += range(int(low), int(high or low) + 1)
    return cores


def _gpus_arg(text):
    """`serve --gpus`: GPU ids (0,1), or none."""
    return [] if text.strip().lower() == "none" else [g for g in text.split(",") if g]


# The pfcon fields `pman run` sends (the podman backend acts on them).
_RUN_PFCON = ("image", "type", "cpu_limit", "memory_limit", "input_dir", "output_dir")
# What --env-from-client never copies (fnmatch patterns of upper-cased names).
CLIENT_ENV_DENY = ("*TOKEN*", "*SECRET*", "*PASSWORD*", "*PASSWD*", "*_PWD", "*KEY*",
                   "*CREDENTIAL*", "*AUTH*", "KRB5CCNAME", "PMAN_*")
# What describes the client's shell, not the job: never copied either.
_CLIENT_SHELL_VARS = ("PWD", "OLDPWD", "SHLVL", "_")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _env_arg(items, from_client):
    """The job's env of `run --env` *items* (K=V, or NAME: the client's
    value) over, with *from_client*, the client's environment but for
    CLIENT_ENV_DENY."""
    env = {}
    if from_client:
        env = {k: v for k, v in os.environ.items() if k not in _CLIENT_SHELL_VARS and
               not any(fnmatch.fnmatchcase(k.upper(), p) for p in CLIENT_ENV_DENY)}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep:
            if not _ENV_NAME_RE.fullmatch(key):
                raise _ClientError("--env takes KEY=VALUE, or the NAME of a variable of this "
                                   "shell to copy, not %r" % item, EXIT_USAGE)
            if key not in os.environ:
                raise _ClientError("--env %s copies %s from this shell, which has no such "
                                   "variable (export it, or give %s=VALUE)" % (key, key, key),
                                   EXIT_USAGE)
            value = os.environ[key]
        elif not key:
            raise _ClientError("--env must be KEY=VALUE, not %r" % item, EXIT_USAGE)
        env[key] = value
    return env


_RELATIVE_RE = re.compile(r"\+([0-9]+(?:\.[0-9]+)?)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _begin_arg(text):
    """`run --begin` *text* as the server takes it: an ISO 8601 time with
    an offset or epoch seconds as given; a relative +N[smhd] as the
    absolute time it means now, with this machine's offset."""
    relative = _RELATIVE_RE.fullmatch(text)
    if relative:
        seconds = float(relative.group(1)) * _UNIT_SECONDS[relative.group(2)]
        if seconds > 100 * 366 * 86400:
            raise _ClientError("--begin %s is more than a hundred years away" % text,
                               EXIT_USAGE)
        return datetime.fromtimestamp(_wall() + seconds).astimezone().isoformat()
    try:
        value = float(text) if re.fullmatch(r"[0-9]+(?:\.[0-9]+)?", text) else text
        parse_begin(value)
    except InvalidArgument:
        raise _ClientError(
            "--begin takes a time with an offset (2026-12-06T14:05:00+01:00), epoch seconds "
            "or a delay from now (+90s, +10m, +2h, +1d), not %r" % text, EXIT_USAGE) from None
    return value


# ls: the columns, and the colour and word of each status on a terminal.
_LS_HEAD = ("JID", "STATUS", "RC", "STARTED", "DURATION", "WAITING", "COMMAND")
_COLOURS = {STARTED: "33", SUCCESS: "32", ERROR: "31", UNDEFINED: "35"}
STATUS_WORDS = {NOTSTARTED: "queued", STARTED: "running", SUCCESS: "succeeded",
                ERROR: "failed", UNDEFINED: "undefined"}


def _statuses_arg(text):
    """The statuses of a --status S,... argument."""
    out = []
    for word in text.split(","):
        status = STATUS_ALIASES.get(word.strip().lower())
        if status is None:
            raise _ClientError("unknown status %r: give queued (or waiting), running, "
                               "succeeded (success, ok), failed, undefined, or pman's own %s"
                               % (word, ", ".join(STATUSES)), EXIT_USAGE)
        if status not in out:
            out.append(status)
    return out


# What a terminal would act on rather than show: C0, DEL and C1 controls (U+009B
# is a CSI) and the bidirectional controls, which reorder what follows them.
_UNSHOWN_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _one_line(text):
    """*text* with control characters shown as escapes: one table row."""
    return _UNSHOWN_RE.sub(lambda m: repr(m.group())[1:-1], text)


def _local_time(stamp, today):
    if not stamp:
        return "-"
    when = datetime.fromtimestamp(_parse_time(stamp)).astimezone()
    return when.strftime("%H:%M:%S" if when.date() == today else "%Y-%m-%d %H:%M")


def _duration(job, now):
    if not job.get("started"):
        return "-"
    end = _parse_time(job["ended"]) if job.get("ended") else now
    s = max(0.0, end - _parse_time(job["started"]))
    if s < 60:
        return "%.1fs" % s
    s = int(s)
    if s < 3600:
        return "%dm%02ds" % (s // 60, s % 60)
    if s < 86400:
        return "%dh%02dm" % (s // 3600, s % 3600 // 60)
    return "%dd%02dh" % (s // 86400, s % 86400 // 3600)


def _table(jobs, colour, width, words=None):
    """The rows of `pman ls`, columns aligned, the command cut to *width*
    (None: never cut), statuses as *words* says (None: pman's own);
    WAITING only when a job in the list waits."""
    now = _wall()
    today = datetime.now().astimezone().date()
    rows = [_LS_HEAD] + [(
        job["jid"], (words or {}).get(job["status"], job["status"]), "-" if job["returncode"] is None else str(job["returncode"]),
        _local_time(job.get("started"), today), _duration(job, now),
        _one_line(job.get("waiting") or "-"), _one_line(job["cmd"]))
        for job in jobs]
    if not any(job.get("waiting") for job in jobs):
        rows = [row[:5] + row[6:] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for n, row in enumerate(rows):
        cells = [cell.ljust(w) if i != 2 else cell.rjust(w)
                 for i, (cell, w) in enumerate(zip(row, widths))]
        line = "  ".join(cells + [row[-1]])
        if width is not None and len(line) > width:
            line = line[:max(width - 1, sum(widths) + 2 * len(widths))] + "…"
        if colour and n and jobs[n - 1]["status"] in _COLOURS:
            start = widths[0] + 2
            line = "%s\x1b[%sm%s\x1b[0m%s" % (line[:start], _COLOURS[jobs[n - 1]["status"]],
                                              line[start:start + widths[1]],
                                              line[start + widths[1]:])
        lines.append(line)
    return lines


def _jobs(client, query, every):
    """(jobs, more) of GET /jobs?*query*: one page, or with *every* page
    after page; *more*: more jobs match than the list has."""
    jobs = []
    while True:
        page = client.json("GET", "/jobs", query=query)
        jobs.extend(page["jobs"])
        if not (every and page.get("next")):
            return jobs, bool(page.get("next"))
        query["after"] = page["next"]


def _cmd_ls(client, args):
    query = {"order": "newest", "limit": MAX_PAGE if args.all else args.limit}
    if args.status:
        query["status"] = ",".join(_statuses_arg(args.status))
    if args.auid is not None:
        query["auid"] = args.auid
    for key, value in _key_values(args.meta, "--meta").items():
        query["meta." + key] = value
    jobs, more = _jobs(client, query, args.all)
    if more:
        print("(the newest %d shown: pman ls --all for every job)" % len(jobs), file=sys.stderr)
    if args.json:
        _print_json(jobs)
        return EXIT_OK
    tty = sys.stdout.isatty()
    colour = tty and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
    width = shutil.get_terminal_size().columns if tty or os.environ.get("COLUMNS") else None
    words = STATUS_WORDS if tty else None
    sys.stdout.write("\n".join(_table(jobs, colour, width, words)) + "\n")
    return EXIT_OK


_SHOW_FIELDS = ("jid", "status", "message", "waiting", "returncode", "pid", "cmd", "group",
                "priority", "after", "after_any", "begin", "hold", "retries", "retry_delay",
                "attempts", "auid", "cwd", "timeout", "env", "meta", "submitted", "started",
                "ended", "stdout", "stderr")


def _ended_as(code):
    if code is None:
        return "no exit code"
    return "exit %d" % code if code >= 0 else "killed by " + signal_name(-code)


def _show_value(job, key, today):
    """The text `pman show` gives field *key* of *job*, or None to leave
    it out: scheduling fields at their defaults say nothing."""
    value = job[key]
    if key == "waiting" and value is None:
        return None
    if key in SCHED_DEFAULTS and (value == SCHED_DEFAULTS[key] or (
            key == "retry_delay" and not job.get("retries"))):
        return None
    if key == "attempts":
        if not value:
            return None
        return "; ".join("%s, ended %s" % (_ended_as(a.get("returncode")),
                                           _local_time(a.get("ended"), today)) for a in value)
    if value in (None, "", [], {}):
        return "-"
    if key in ("after", "after_any"):
        return ", ".join(value)
    return value if isinstance(value, str) else json.dumps(value)


def _cmd_show(client, args):
    jid = _checked_jids([args.jid])[0]
    job = client.json("GET", "/%s/" % jid)
    tails = {"stdout": "", "stderr": ""}
    if job["status"] != NOTSTARTED:
        try:
            tree = client.json("GET", "/%s/startInfo" % jid)
            info = tree["GET"][jid]["startInfo"].get("0", {})
            tails = {name: info.get(name, "") for name in tails}
        except _ClientError:
            pass                # removed meanwhile: the record above is what there was
    if args.json:
        job["tail"] = tails
        _print_json(job)
        return EXIT_OK
    out = []
    shown = [k for k in _SHOW_FIELDS if k in job] + sorted(
        k for k in job if k not in _SHOW_FIELDS and k != "logs")
    today = datetime.now().astimezone().date()
    shown = [(key, _show_value(job, key, today)) for key in shown]
    shown = [(key, value) for key, value in shown if value is not None]
    width = max(len(key) for key, _ in shown) + 1
    for key, value in shown:
        out.append("%-*s %s" % (width, key + ":", _one_line(value)))
    for name, text in tails.items():
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        lines = lines[-args.lines:] if args.lines else []
        out.append("--- %s (last %d line%s) ---" % (name, len(lines),
                                                     "" if len(lines) == 1 else "s"))
        out.extend(lines)
    sys.stdout.write("\n".join(out) + "\n")
    return EXIT_OK


def _cmd_logs(client, args):
    jid = _checked_jids([args.jid])[0]
    stream = "stderr" if args.stderr else "stdout"
    out = sys.stdout.buffer
    if args.follow:
        try:
            _follow(client, jid, {stream: out}, args.offset)
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
        return _exit_with_job(client.job(jid))
    offset = args.offset
    while True:
        data, offset, eof = client.log_chunk(jid, stream, offset)
        out.write(data)
        if eof or not data:
            break
    out.flush()
    return EXIT_OK


def _cmd_wait(client, args):
    if args.jids:
        jids = _checked_jids(list(dict.fromkeys(args.jids)))
    else:           # every job queued or running now
        active, _ = _jobs(client, {"status": ",".join(ACTIVE), "limit": MAX_PAGE}, True)
        jids = [job["jid"] for job in active]
    deadline = _time() + (float("inf") if args.timeout is None else args.timeout)
    tty = sys.stderr.isatty()
    started = _time()
    done = {}
    pending = list(jids)

    def progress(end="\r"):
        failed = sum(1 for j in done.values() if j["status"] != SUCCESS)
        sys.stderr.write("\r%d/%d done, %d failed, %.1f s\x1b[K%s" % (
            len(done), len(jids), failed, _time() - started, end))
        sys.stderr.flush()

    try:
        while pending:
            left = deadline - _time()
            if left <= 0:
                break
            poll = min(left, PROGRESS_EVERY if tty else CLIENT_WAIT)
            job = client.job(pending[0], wait=poll)
            if job["status"] not in ACTIVE:
                done[pending.pop(0)] = job
            elif tty:           # jobs that ended meanwhile, for the count
                active, _ = _jobs(client, {"status": "notstarted,started",
                                           "limit": MAX_PAGE}, True)
                active = {j["jid"] for j in active}
                for jid in [j for j in pending if j not in active]:
                    job = client.job(jid)
                    if job["status"] not in ACTIVE:
                        done[jid] = job
                        pending.remove(jid)
            if tty:
                progress()
    except KeyboardInterrupt:
        if tty:
            progress("\n")
        return EXIT_INTERRUPTED
    if tty:
        progress("\n")
    records = [done[jid] if jid in done else client.job(jid) for jid in jids]
    return _wait_outcome(args, records, pending)


def _wait_outcome(args, records, pending):
    """Report what `pman wait` saw (*records*; *pending*: jids it timed
    out on) and return its exit status."""
    if args.json:
        _print_json(records)
    for job in records:
        if job["status"] not in (SUCCESS,) + ACTIVE:
            print("pman: %s %s: %s" % (job["jid"], job["status"], job["message"]),
                  file=sys.stderr)
    if pending:
        print("pman: timed out after %g s: %d of %d jobs not finished: %s%s" % (
            args.timeout, len(pending), len(records), ", ".join(pending[:10]),
            ", ..." if len(pending) > 10 else ""), file=sys.stderr)
        return EXIT_TIMEOUT
    return EXIT_OK if all(j["status"] == SUCCESS for j in records) else EXIT_FAILED


def _each(jids, act):
    """Apply *act* to every jid; an error is reported and the rest go on."""
    code, results = EXIT_OK, []
    for jid in _checked_jids(jids):
        try:
            results.append(act(jid))
        except _ClientError as e:
            if e.http_status is None:
                raise           # no server at all: no point going on
            print("pman: %s: %s" % (jid, e), file=sys.stderr)
            code = EXIT_SERVER
    return code, results


def _cmd_kill(client, args):
    body = {}
    sig = signal.SIGTERM
    if args.signal is not None:
        try:
            sig = parse_signal(args.signal)
        except InvalidArgument as e:
            raise _ClientError(str(e), EXIT_USAGE) from None
        body["signal"] = args.signal
    if args.grace is not None:
        body["grace"] = args.grace

    def kill(jid):
        job = client.json("POST", "/%s/kill" % jid, body=body, expect=(202,))
        if not (args.quiet or args.json):
            print(_killed_line(job, sig, args.grace), flush=True)
        return job

    code, jobs = _each(args.jids, kill)
    if args.json:
        _print_json(jobs)
    return code


def _killed_line(job, sig, grace):
    """What `pman kill` did to *job* (its record as the kill left it)."""
    jid, name = job["jid"], signal_name(sig)
    if job["status"] not in ACTIVE:
        if job["message"].startswith("cancelled before it started"):
            return "%s: cancelled (it was queued)" % jid
        return "%s: had already ended (%s), nothing sent" % (jid, job["status"])
    if sig not in ENDING_SIGNALS or sig == signal.SIGKILL:
        return "%s: %s sent" % (jid, name)
    return "%s: %s sent; SIGKILL follows after %s if it still runs" % (
        jid, name, "the server's grace" if grace is None else "%g s" % grace)


def _cmd_rm(client, args):
    query = {"kill": "1" if args.kill else "0"}

    def remove(jid):
        try:
            client.request("DELETE", "/%s/" % jid, query=query, expect=(204,))
        except _ClientError as e:
            if e.http_status != 409:
                raise
            raise _ClientError("job %s is queued or running: pman rm --kill %s kills it "
                               "first" % (jid, jid), http_status=409) from None
        if not args.quiet:
            print("%s: removed" % jid, flush=True)

    return _each(args.jids, remove)[0]


# What `pman restart` carries over from the finished job (the command too).
_RESTART_FIELDS = ("auid", "cwd", "timeout", "meta", "group", "priority", "retries",
                   "retry_delay", "cpus", "memory", "gpus") + PFCON_FIELDS


def _cmd_restart(client, args):
    jid = _checked_jids([args.jid])[0]
    job = client.json("GET", "/%s/" % jid)
    if job["status"] in ACTIVE:
        raise _ClientError("job %s is %s: only a finished job is restarted (pman kill %s, "
                           "or pman wait %s, first)" % (jid, job["status"], jid, jid))
    body = {"jid": jid}
    if job.get("argv"):
        body["entrypoint"], body["args"] = job["argv"][:1], job["argv"][1:]
    else:
        body["cmd"] = job["cmd"]
    for key in _RESTART_FIELDS:
        if job.get(key) not in (None, "", [], {}):
            body[key] = job[key]
    # The server shows an env's names, never its values: they come again.
    env = _env_arg(args.env, False)
    missing = [name for name in job.get("env") or () if name not in env]
    if missing:
        raise _ClientError("job %s had env %s, whose values the server does not show: give "
                           "them again, e.g. pman restart %s --env %s=... (or --env %s to "
                           "copy this shell's)" % (jid, ", ".join(missing), jid, missing[0],
                                                   missing[0]), EXIT_USAGE)
    if env:
        body["env"] = ["%s=%s" % pair for pair in env.items()]
    return _submitted(client, args, body)


def _cmd_clean(client, args):
    statuses = _statuses_arg(args.status) if args.status else [SUCCESS, ERROR, UNDEFINED]
    if any(status in ACTIVE for status in statuses):
        raise _ClientError("clean forgets finished jobs only, never queued or running ones "
                           "(pman rm --kill JID kills one and forgets it)", EXIT_USAGE)
    jobs, _ = _jobs(client, {"status": ",".join(statuses), "limit": MAX_PAGE}, True)
    forgotten = []

    def remove(jid):
        try:
            client.request("DELETE", "/%s/" % jid, query={"kill": "0"}, expect=(204,))
            forgotten.append(jid)
        except _ClientError as e:
            if e.http_status != 404:    # 404: removed meanwhile
                raise

    code = _each([job["jid"] for job in jobs], remove)[0]
    if not args.quiet:
        print("forgot %d finished job%s" % (len(forgotten), "" if len(forgotten) == 1
                                            else "s"))
    return code


def _cmd_shutdown(client, args):
    client.json("POST", "/cmd/", body={"action": "quit"})
    client.close()
    deadline = _time() + STOP_TIMEOUT
    while True:
        try:
            socket.create_connection((client.host, client.port), timeout=1).close()
        except OSError:
            break
        if _time() > deadline:
            raise _ClientError("the server at %s still answers %g s after it was asked to "
                               "stop" % (client.url, STOP_TIMEOUT))
        _sleep(0.02)
    if not args.quiet:
        print("pman: the server at %s has stopped; its running jobs keep running, and the "
              "next server on its state directory takes them back" % client.url,
              file=sys.stderr)
    return EXIT_OK


def _cmd_job_action(client, args):
    """hold, release, priority: one POST per job; --json prints the jobs."""
    body = {}
    if args.subcommand == "priority":
        body = {"priority": args.priority}
        jids = [args.jid]
    else:
        jids = args.jids
    code, jobs = _each(jids, lambda jid: client.json(
        "POST", "/%s/%s" % (jid, args.subcommand), body=body))
    if args.json:
        _print_json(jobs)
    return code


def _cmd_pause(client, args):
    path = "/" + args.subcommand
    if args.group is not None:
        path = "/groups/%s%s" % (_checked_group(args.group), path)
    reply = client.json("POST", path, body={})
    if args.json:
        _print_json(reply)
    return EXIT_OK


def _checked_group(name):
    try:
        return check_group(name)
    except InvalidArgument as e:
        raise _ClientError(str(e), EXIT_USAGE) from None


def _cmd_group(client, args):
    if args.max_running is not None and args.name is None:
        raise _ClientError("give the group: pman group NAME --max-running N", EXIT_USAGE)
    if args.max_running is not None:
        limit = _max_running_arg(args.max_running)
        group = client.json("PUT", "/groups/" + _checked_group(args.name),
                            body={"max_running": limit})
        reply = {"paused": None, "groups": [group]}
    else:
        reply = client.json("GET", "/groups")
        if args.name is not None:   # a group not listed has no limit, pause or jobs
            reply["groups"] = [g for g in reply["groups"]
                               if g["name"] == _checked_group(args.name)] or [
                {"name": args.name, "max_running": None, "paused": False, "running": 0,
                 "waiting": 0}]
    if args.json:
        _print_json(reply["groups"][0] if args.name is not None else reply)
        return EXIT_OK
    rows = [("GROUP", "LIMIT", "PAUSED", "RUNNING", "WAITING")] + [(
        _one_line(g["name"]), "-" if g["max_running"] is None else str(g["max_running"]),
        "yes" if g["paused"] else "no", str(g["running"]), str(g["waiting"]))
        for g in reply["groups"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    if reply["paused"]:
        out.append("the manager is paused: no group starts a job (pman resume)")
    sys.stdout.write("\n".join(out) + "\n")
    return EXIT_OK


def _max_running_arg(text):
    if text == "none":
        return None
    if not re.fullmatch(r"[0-9]{1,9}", text):
        raise _ClientError("--max-running takes a number of jobs, or none for no limit of "
                           "the group's own, not %r" % text, EXIT_USAGE)
    return int(text)


# ---------------------------------------------------------------------------
# The command line: its parser and main
# ---------------------------------------------------------------------------

def _client_parser():
    fmt = argparse.RawDescriptionHelpFormatter
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=None,
                        help="the server (default $PMAN_URL, else %s)" % DEFAULT_URL)
    common.add_argument("--token-file", default=None,
                        help="send the bearer token read from this file (default "
                        "$PMAN_TOKEN)")
    p = _Parser(prog="pman", formatter_class=fmt, usage="pman [COMMAND] [options]",
                description="pman runs shell jobs through a server (pman serve) and keeps "
                "their exit codes\nacross crashes.  `pman` alone lists the queue.",
                epilog=_CLIENT_EPILOG)
    p.add_argument("--version", action="version", version="pman " + __version__)
    sub = p.add_subparsers(dest="subcommand", metavar="COMMAND", prog="pman")
    sub.add_parser("serve", add_help=False,
                   help="Start the server (its options: pman serve --help).")

    def add(name, summary, example):
        return sub.add_parser(name, parents=[common], help=summary, description=summary,
                              epilog="example:\n" + example, formatter_class=fmt)

    s = add("run", "Submit a job and print its jid.",
            "  pman run -- 'make test && echo ok'        # one argument: a shell command\n"
            "  pman run --jid build-1 -- ls -l /tmp        # several: argv, no shell\n"
            "  pman run --wait -- 'sleep 1; exit 3'; echo $?     # 3\n"
            "  pman run --follow --env GREETING=hi --env HOME -- 'echo $GREETING $HOME'\n"
            "  pman run --after build-1 --group gpu --retries 2 -- ./test.sh\n"
            "  pman run --begin +10m --priority 5 -- ./nightly.sh\n"
            "  pman run --image localhost/busybox:test -- 'echo hi'   # the podman backend\n\n"
            "The job gets the server's environment, not this shell's, plus --env.")
    s.add_argument("--jid", help="the job id (default: a number no job has had)")
    s.add_argument("--env", action="append", metavar="K=V|NAME",
                   help="set a variable for the job; a NAME alone copies this shell's "
                   "value (repeatable)")
    s.add_argument("--env-from-client", action="store_true",
                   help="copy this shell's whole environment but names matching %s "
                   "(any case); --env goes over it" % ", ".join(CLIENT_ENV_DENY))
    s.add_argument("--cwd", help="working directory (default: the current one when "
                   "the server is on this machine, else the server's)")
    s.add_argument("--timeout", type=float, metavar="S", help="kill the job after S seconds")
    s.add_argument("--meta", action="append", metavar="K=V",
                   help="a metadata string to store with the job (repeatable)")
    s.add_argument("--auid", help="who the job is for (a user id), recorded and "
                   "filtered on (ls --auid); pman checks nothing about it")
    s.add_argument("--wait", action="store_true",
                   help="wait for the job and exit with its exit code (128+N for signal N)")
    s.add_argument("--follow", "-f", action="store_true",
                   help="copy its stdout and stderr to ours while it runs, then exit with "
                   "its code")
    s.add_argument("--json", action="store_true", help="print the job object as JSON")
    s.add_argument("--start-server", action="store_true",
                   help="if nothing answers at a loopback --url, start `pman serve` there "
                   "in the background first ($PMAN_START_SERVER=1 does the same)")
    s.add_argument("--after", action="append", metavar="JID[,JID]",
                   help="start only once each of these jobs has finished successfully; if "
                   "one fails, this one never runs (repeatable)")
    s.add_argument("--after-any", action="append", metavar="JID[,JID]",
                   help="start only once each of these jobs has ended, however (repeatable)")
    s.add_argument("--group", metavar="G",
                   help="run in group G, which has its own limit (pman group; default "
                   "\"default\")")
    s.add_argument("--priority", type=int, metavar="N",
                   help="among jobs that may start, higher first (default 0)")
    s.add_argument("--begin", metavar="T",
                   help="not before T: a time with an offset (2026-12-06T14:05:00+01:00), "
                   "epoch seconds, or a delay from now (+90s, +10m, +2h, +1d)")
    s.add_argument("--hold", action="store_true",
                   help="queue it held: it starts only after pman release JID")
    s.add_argument("--retries", type=int, metavar="N",
                   help="if it fails, run it again up to N times")
    s.add_argument("--retry-delay", type=float, metavar="S",
                   help="seconds before the first retry, doubling before each next one "
                   "(default 1)")
    s.add_argument("--cpus", type=_count_arg, metavar="N",
                   help="N CPUs of its own: it starts once they are free, pinned to them")
    s.add_argument("--memory", type=_mib_arg, metavar="SIZE",
                   help="memory it may use, in MiB or with a unit (512M, 4G): it starts "
                   "once that much is free, and is held to it where pman can (a cgroup)")
    s.add_argument("--gpus", type=_count_arg, metavar="N",
                   help="N GPUs of its own, in its CUDA_VISIBLE_DEVICES")
    c = s.add_argument_group("containers (the podman backend; pfcon's fields)")
    c.add_argument("--image", help="the image to run the job in (required there)")
    c.add_argument("--entrypoint", metavar="PROG",
                   help="the program to run; the words after -- are its arguments")
    c.add_argument("--cpu-limit", type=int, metavar="MILLICORES")
    c.add_argument("--memory-limit", type=int, metavar="MIB")
    c.add_argument("--type", choices=("fs", "ds", "ts"),
                   help="a ChRIS plugin's type: outgoing (and incoming) directories follow")
    c.add_argument("--input-dir", metavar="DIR",
                   help="mounted read-only at /share/incoming (under the server's --storebase)")
    c.add_argument("--output-dir", metavar="DIR",
                   help="mounted at /share/outgoing (under the server's --storebase)")
    s.add_argument("command", nargs="*", help="after --: one shell string, or an argv of "
                   "several words run without a shell")

    s = add("ls", "List jobs, newest first (one page; --all for every job).",
            "  pman ls\n  pman ls --status running,queued --meta project=p1\n"
            "  pman ls --status failed\n"
            "  pman ls --all --json | python3 -m json.tool")
    s.add_argument("--status", metavar="S,...", help="only jobs in these statuses: queued "
                   "(or waiting), running, succeeded (success, ok), failed, undefined, or "
                   "pman's own (notstarted, started, finishedSuccessfully, "
                   "finishedWithError); on a terminal the table shows the short words")
    s.add_argument("--auid", help="only jobs of this auid")
    s.add_argument("--meta", action="append", metavar="K=V",
                   help="only jobs whose meta key K is V (repeatable)")
    s.add_argument("--limit", type=int, default=PAGE_SIZE, metavar="N",
                   help="jobs in the page (default %d, at most %d)" % (PAGE_SIZE, MAX_PAGE))
    s.add_argument("--all", action="store_true", help="every job, page after page")
    s.add_argument("--json", action="store_true", help="a JSON list of job objects")

    s = add("show", "Show a job's whole record and the tail of both logs.",
            "  pman show build-1\n  pman show build-1 --json")
    s.add_argument("jid")
    s.add_argument("-n", "--lines", type=int, default=10, metavar="N",
                   help="lines of each log's tail (default 10; --json has the whole tail)")
    s.add_argument("--json", action="store_true",
                   help="the job object, plus \"tail\": {\"stdout\", \"stderr\"}")

    s = add("logs", "Print the bytes of a job's stdout (or stderr), exactly.",
            "  pman logs build-1 > build.log\n"
            "  pman logs -f --stderr build-1          # until it ends; exits with its code")
    s.add_argument("jid")
    s.add_argument("-f", "--follow", action="store_true",
                   help="follow until the job ends, then exit with its exit code")
    s.add_argument("--stderr", action="store_true", help="stderr instead of stdout")
    s.add_argument("--offset", type=int, default=0, metavar="N",
                   help="start at byte N (default 0)")

    s = add("wait", "Wait until jobs end: 0 all succeeded, 1 some failed, 2 timeout.",
            "  pman wait build-1 test-1 test-2 --timeout 600 && echo all good\n"
            "  pman wait                 # every job queued or running now")
    s.add_argument("jids", nargs="*", metavar="JID",
                   help="the jobs (default: every job queued or running now)")
    s.add_argument("--timeout", type=float, metavar="S",
                   help="give up after S seconds (exit 2)")
    s.add_argument("--json", action="store_true",
                   help="print the job objects as JSON at the end")

    s = add("kill", "Signal jobs: end them (SIGKILL follows after the grace), or send "
            "another signal once.",
            "  pman kill build-1\n  pman kill --signal INT --grace 30 build-1 test-1\n"
            "  pman kill -s STOP build-1; pman kill -s CONT build-1   # pause, go on\n\n"
            "TERM (the default), INT and QUIT ask a job to end: SIGKILL follows after the\n"
            "grace if it still runs, and the job is recorded as killed; KILL is final.  A\n"
            "queued job is cancelled.  Any other signal (STOP, CONT, TSTP, HUP, USR1, ...)\n"
            "is sent once to a running job, with no SIGKILL after it.  One line per job\n"
            "says what was done.")
    s.add_argument("jids", nargs="+", metavar="JID")
    s.add_argument("--signal", "-s", metavar="SIG",
                   help="a name (TERM, SIGTERM) or number (default TERM)")
    s.add_argument("--grace", type=float, metavar="S",
                   help="seconds before SIGKILL (default: the server's)")
    s.add_argument("--json", action="store_true", help="print the job objects as JSON")
    s.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")

    s = add("rm", "Forget finished jobs and delete their logs.",
            "  pman rm build-1\n  pman rm --kill stuck-1           # kill it first if it runs")
    s.add_argument("jids", nargs="+", metavar="JID")
    s.add_argument("--kill", action="store_true",
                   help="kill a queued or running job first (else it is an error)")
    s.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")

    s = add("restart", "Run a finished job again: the same command, environment, cwd and "
            "options; the record keeps the earlier run.",
            "  pman restart build-1\n  pman restart --follow build-1")
    s.add_argument("jid", metavar="JID")
    s.add_argument("--env", action="append", metavar="K=V|NAME",
                   help="the job's env again (the server never shows values): K=V, or a "
                   "NAME alone copies this shell's value (repeatable)")
    s.add_argument("--wait", action="store_true",
                   help="wait for the job and exit with its exit code")
    s.add_argument("--follow", "-f", action="store_true",
                   help="copy its stdout and stderr to ours, then exit with its code")
    s.add_argument("--json", action="store_true", help="print the job object as JSON")

    s = add("clean", "Forget finished jobs and delete their logs (never queued or "
            "running ones).", "  pman clean\n  pman clean --status succeeded")
    s.add_argument("--status", metavar="S,...",
                   help="only these statuses: succeeded, failed, undefined (default: all three)")
    s.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")

    s = add("shutdown", "Stop the server.  Its running jobs keep running, as with SIGTERM; "
            "the next server on its state directory takes them back.",
            "  pman shutdown\n  pman shutdown --url http://127.0.0.1:5011")
    s.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")

    s = add("hold", "Keep queued jobs from starting until pman release.",
            "  pman hold deploy-1\n  pman run --hold --jid deploy-2 -- ./deploy.sh")
    s.add_argument("jids", nargs="+", metavar="JID")
    s.add_argument("--json", action="store_true", help="print the job objects as JSON")

    s = add("release", "Let held jobs start (when what else they wait for allows).",
            "  pman release deploy-1 deploy-2")
    s.add_argument("jids", nargs="+", metavar="JID")
    s.add_argument("--json", action="store_true", help="print the job objects as JSON")

    s = add("priority", "Change a queued job's priority: among jobs that may start, higher "
            "first.", "  pman priority urgent-1 10\n  pman priority batch-7 -5")
    s.add_argument("jid")
    s.add_argument("priority", type=int, metavar="N")
    s.add_argument("--json", action="store_true", help="print the job object as JSON")

    s = add("pause", "Start no new job (of one group, or at all); running jobs go on.",
            "  pman pause                 # drain: running jobs end, nothing new starts\n"
            "  pman pause --group gpu")
    s.add_argument("--group", metavar="G", help="pause only group G")
    s.add_argument("--json", action="store_true", help="print the server's reply as JSON")

    s = add("resume", "Undo pman pause (of one group, or of the manager).",
            "  pman resume\n  pman resume --group gpu")
    s.add_argument("--group", metavar="G", help="resume only group G")
    s.add_argument("--json", action="store_true", help="print the server's reply as JSON")

    s = add("group", "List groups (limit, paused, running, waiting), or set one's limit.",
            "  pman group\n  pman group gpu --max-running 2\n"
            "  pman group gpu --max-running none      # no limit of its own")
    s.add_argument("name", nargs="?", metavar="NAME", help="only this group")
    s.add_argument("--max-running", metavar="N",
                   help="set the group's limit of jobs running at once (none: no limit of "
                   "its own; the server's --max-running still holds)")
    s.add_argument("--json", action="store_true", help="print the groups as JSON")
    return p


_CLIENT_EPILOG = """\
examples:
  pman serve &                         start a server (127.0.0.1:5010)
  pman run -- 'echo hello'             submit a job: prints its jid
  pman                                 the queue (pman ls)
  pman logs -f 1                       follow job 1 to its end
  pman shutdown                        stop the server; running jobs go on

Every command has --help.  The server is --url (default $PMAN_URL, else
%s); the token is read from --token-file (default
$PMAN_TOKEN).
""" % DEFAULT_URL

_CLIENT_COMMANDS = {"run": _cmd_run, "ls": _cmd_ls, "show": _cmd_show, "logs": _cmd_logs,
                    "wait": _cmd_wait, "kill": _cmd_kill, "rm": _cmd_rm,
                    "restart": _cmd_restart, "clean": _cmd_clean, "shutdown": _cmd_shutdown,
                    "hold": _cmd_job_action, "release": _cmd_job_action,
                    "priority": _cmd_job_action, "pause": _cmd_pause, "resume": _cmd_pause,
                    "group": _cmd_group}


def _client_main(argv):
    command = []
    if argv[0] == "run" and "--" in argv:       # everything after -- is the job's
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    args = _client_parser().parse_args(argv)
    if argv[0] == "run":
        args.command = (args.command or []) + command
    logging.basicConfig(level=logging.WARNING, format="pman: %(message)s")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="replace")    # a command in a C locale
        except AttributeError:
            pass
    client = None
    try:
        token = _read_token(args.token_file) if args.token_file else (
            os.environ.get("PMAN_TOKEN") or None)
        start = getattr(args, "start_server", False) or os.environ.get(
            "PMAN_START_SERVER", "") in ("1", "true", "yes")
        client = _Client(args.url or os.environ.get("PMAN_URL") or DEFAULT_URL, token,
                         start_server=start and argv[0] == "run")
        return _CLIENT_COMMANDS[argv[0]](client, args)
    except _ClientError as e:
        print("pman: %s" % e, file=sys.stderr)
        return e.code
    except PmanError as e:
        print("pman: %s" % e, file=sys.stderr)
        return EXIT_SERVER
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:         # `pman ls | head`: the reader has gone
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 128 + signal.SIGPIPE
    finally:
        if client is not None:
            client.close()


def _queue_or_help():
    """`pman` alone: the queue when a server answers, else how to start one."""
    url = os.environ.get("PMAN_URL") or DEFAULT_URL
    try:
        _Client(url).close()
        host, port = urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port
        socket.create_connection((host, port or 80), timeout=CLIENT_IDLE).close()
    except (_ClientError, OSError):
        sys.stdout.write(_NO_SERVER_HELP % url)
        return EXIT_SERVER
    return _client_main(["ls"])


_NO_SERVER_HELP = """\
pman: nothing answers at %s, so there is no queue to show.
  pman serve &                        start a server (its options: pman serve --help)
  pman run --start-server -- CMD      or start one with the first job
  pman run -- 'echo hello'            then submit jobs; pman alone lists them
  pman --help                         every command
"""


def main(argv=None):
    """The command line: ``pman serve [options]`` (or options alone, but
    --help) serves (see `_serve`); ``pman run|ls|show|...``
    (_CLIENT_COMMANDS) is a client of a server; ``pman`` alone lists the
    queue.  Returns the exit status (README.rst, "Exit statuses")."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0].split("=")[0] == "--url":
        print("pman: --url is an option of the client commands: it goes after the command, "
              "as in pman ls --url URL", file=sys.stderr)
        return EXIT_USAGE
    if not argv:
        return _queue_or_help()
    if argv[0] in ("-h", "--help"):
        _client_parser().print_help()
        return EXIT_OK
    if argv[0].startswith("-"):
        return _serve(argv)
    if argv[0] == "serve":
        return _serve(argv[1:], "pman serve")
    if argv[0] in _CLIENT_COMMANDS:
        return _client_main(argv)
    print("pman: unknown command %r: one of %s (or options: pman --help)"
          % (argv[0], ", ".join(["serve"] + list(_CLIENT_COMMANDS))), file=sys.stderr)
    return EXIT_USAGE


# ---------------------------------------------------------------------------
# The original pman's module entry point
# ---------------------------------------------------------------------------

# The option names of the original's ``pman.pman(...)``: those its
# constructor read and those its own start script (bin/pman) passed.
_ORIGINAL_OPTIONS = ("IP", "port", "DBpath", "debugFile", "debugToFile", "listeners", "raw",
                     "http", "protocol", "within")
# Those that mean nothing here: raw, http and protocol configured its ZeroMQ
# front end (pman serves HTTP over TCP, nothing else); within named an
# object enclosing the server.
_IGNORED_OPTIONS = ("raw", "http", "within")


class CompatServer:
    """What `pman` returns: a `JobManager` served over HTTP, bound when it
    is made, serving once `start` is called.  Attributes: ``manager``,
    ``server`` (from `make_server`), ``server_address`` ((host, port))."""

    def __init__(self, host="127.0.0.1", port=5010, *, state_dir=None,
                 listeners=DEFAULT_LISTENERS, log_file=None):
        self._lock = threading.Lock()       # guards _state
        self._state = "new"                 # -> "serving" -> "closed"
        self._closed = threading.Event()
        self._serving_thread = None
        self._handler = self._level = None
        if log_file is not None:
            # An entry point, like main(): it may configure pman's logging.
            try:
                self._handler = logging.FileHandler(log_file, encoding="utf-8")
            except OSError as e:
                raise PmanError("cannot open debugFile %s: %s" % (log_file, e.strerror)) from None
            self._handler.setFormatter(logging.Formatter(
                "%(asctime)s pman %(levelname)s %(message)s"))
            log.addHandler(self._handler)
            self._level = log.level
            if not log.isEnabledFor(logging.INFO):
                log.setLevel(logging.INFO)  # requests too, as the original's debug file
        try:
            self.manager = JobManager(state_dir)
            try:
                self.server = make_server(self.manager, host, port, listeners=listeners)
            except BaseException:
                self.manager.close()
                raise
        except BaseException:
            self._unlog()
            raise

    @property
    def server_address(self):
        return self.server.server_address

    def start(self):
        """Serve until SIGTERM or SIGINT (handled only when `start` runs in
        the main thread, and restored after), the ``quit`` action, or
        `stop`; then flush the state, close the manager and return.
        Running jobs keep running, as with ``main()``."""
        with self._lock:
            if self._state != "new":
                raise PmanError("this pman server was already started or stopped")
            self._state = "serving"
            self._serving_thread = threading.current_thread()
        try:
            _serve_until_stopped(self.server, self.manager)
        finally:
            self._closed_now()

    def stop(self):
        """End `start` from another thread and return once the state is
        flushed and the manager closed; a server never started is just
        closed.  Safe to call more than once."""
        with self._lock:
            state = self._state
            if state == "new":
                self._state = "closed"
        if state == "new":
            try:
                _close_served(self.server, self.manager)
            finally:
                self._closed_now()
            return
        if state == "serving":
            if threading.current_thread() is self._serving_thread:
                self.server.stop_soon()     # shutdown() would wait for itself
                return
            self.server.shutdown()
        self._closed.wait()

    def _closed_now(self):
        self._unlog()
        with self._lock:
            self._state = "closed"
        self._closed.set()

    def _unlog(self):
        if self._handler is not None:
            log.removeHandler(self._handler)
            self._handler.close()
            log.setLevel(self._level)
            self._handler = None

    def __repr__(self):
        return "<pman.CompatServer %s:%s %s>" % (self.server_address[:2] + (self._state,))


def _whole_number(name, value, top):
    """An option the original took as an int or as its decimal string."""
    if isinstance(value, str) and value.strip().isdigit() and value.strip().isascii():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        raise InvalidArgument("%s must be a whole number from 0 to %d, not %s"
                              % (name, top, _shown(value)))
    return value


def _original_options(options, kwargs):
    """The options of a `pman` call, merged: each name given once, and
    every name one of the original's."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise InvalidArgument("options must be a dict of the original pman's option names, "
                              "not %s" % _shown(options))
    twice = sorted(set(options) & set(kwargs))
    if twice:
        raise InvalidArgument("option(s) given both in the dict and as keywords: %s"
                              % ", ".join(twice))
    given = dict(options, **kwargs)
    unknown = [name for name in given if name not in _ORIGINAL_OPTIONS]
    if unknown:
        raise InvalidArgument("unknown pman option(s) %s: the names accepted are %s"
                              % (", ".join(_shown(n) for n in unknown),
                                 ", ".join(_ORIGINAL_OPTIONS)))
    return given


def pman(options=None, **kwargs):
    """The original pman's module entry point: ``pman.pman(IP=..., port=...)``
    or ``pman.pman({"debugFile": ...})`` (both forms; a name given in both
    is an error), then ``.start()`` to serve.  Returns a `CompatServer`.

    The original's names: ``IP`` (the address to bind, default 127.0.0.1),
    ``port`` (default 5010; 0 picks one), ``DBpath`` (the state directory,
    default as for `JobManager`), ``debugFile`` (a file that pman's log,
    requests included, is appended to), ``listeners`` (requests processed at
    once), ``debugToFile`` (false: debugFile is not written, as the
    original's start script passes both); ``raw``, ``http``, ``within``
    and ``protocol`` ("tcp", the only one) are accepted, mean nothing here
    and are logged as ignored.  Any other name raises InvalidArgument.
    """
    given = _original_options(options, kwargs)
    ignored = [name for name in _IGNORED_OPTIONS if name in given]
    if ignored:
        log.info("pman.pman: option(s) %s ignored: they have no meaning here",
                 ", ".join(ignored))
    if "debugToFile" in given and not given["debugToFile"]:
        given.pop("debugFile", None)
    protocol = given.get("protocol", "tcp")
    if protocol != "tcp":
        raise InvalidArgument("protocol %s is not served: pman speaks HTTP over 'tcp' only"
                              % _shown(protocol))
    host = given.get("IP", "127.0.0.1")
    if not isinstance(host, str) or not host:
        raise InvalidArgument("IP must be an address string, not %s" % _shown(host))
    paths = {}
    for name in ("DBpath", "debugFile"):
        value = given.get(name)
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise InvalidArgument("%s must be a path, not %s" % (name, _shown(value)))
        paths[name] = value
    port = _whole_number("port", given.get("port", 5010), 65535)
    listeners = _whole_number("listeners", given.get("listeners", DEFAULT_LISTENERS), 1 << 16)
    return CompatServer(host, port, state_dir=paths["DBpath"], log_file=paths["debugFile"],
                        listeners=listeners)


# ---------------------------------------------------------------------------
# The status page (data)
# ---------------------------------------------------------------------------

# One static page at / (and /ui).  It holds no data, so it is served without
# a token; every API call it makes carries one.  Its code is inline, and the
# Content-Security-Policy allows exactly that code (by hash) and connections
# to this origin alone.

_PAGE_CSS = """\
:root{color-scheme:light dark;--bg:#fff;--fg:#1d2430;--mut:#667085;--line:#d9dee7;--sel:#e8f0fe;
--run:#1565c0;--ok:#2e7d32;--err:#c62828;--q:#8d6e00;--und:#6a1b9a}
@media (prefers-color-scheme:dark){:root{--bg:#15181e;--fg:#e4e7ec;--mut:#98a2b3;--line:#2c323c;
--sel:#1f2a3d;--run:#64b5f6;--ok:#81c784;--err:#ef9a9a;--q:#ffd54f;--und:#ce93d8}}
*{box-sizing:border-box}
body{margin:0;font:14px/1.4 system-ui,sans-serif;background:var(--bg);color:var(--fg)}
header.top{display:flex;gap:1em;align-items:baseline;padding:.6em 1em;
  border-bottom:1px solid var(--line)}
h1{font-size:1.2em;margin:0}h2{font-size:1.05em;margin:0;word-break:break-all}
.mut{color:var(--mut)}
#live.off{color:var(--err)}
#counts{display:flex;flex-wrap:wrap;gap:.5em;padding:.6em 1em}
#counts button{border:1px solid var(--line);background:none;color:inherit;border-radius:1em;
  padding:.2em .8em;cursor:pointer;font:inherit}
#counts button.on{background:var(--sel)}
#counts b{margin-left:.4em}
#groups{display:flex;flex-wrap:wrap;gap:.3em 1.2em;padding:0 1em .6em}
#groups .paused,#paused{color:var(--q)}
td.wait{color:var(--q)}
#filters{display:flex;flex-wrap:wrap;gap:1em;padding:0 1em .6em}
input,select,button{font:inherit}
.wrap{display:flex;align-items:flex-start}
main{flex:1;min-width:0;overflow-x:auto;padding:0 1em 1em}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.25em .5em;border-bottom:1px solid var(--line);white-space:nowrap}
td.cmd{max-width:20em;overflow:hidden;text-overflow:ellipsis}
td.msg{max-width:16em;overflow:hidden;text-overflow:ellipsis}
tbody tr{cursor:pointer}tbody tr:hover,tbody tr.sel{background:var(--sel)}
.notstarted{color:var(--q)}.started{color:var(--run)}.finishedSuccessfully{color:var(--ok)}
.finishedWithError{color:var(--err)}.undefined{color:var(--und)}
#detail{width:38%;min-width:22em;flex:none;border-left:1px solid var(--line);padding:0 1em 1em;
  position:sticky;top:0;max-height:100vh;overflow:auto}
#detail header{display:flex;gap:.5em;align-items:center;padding:.6em 0}
#detail header h2{flex:1}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.15em 1em;margin:0 0 .8em}
dt{color:var(--mut)}dd{margin:0;word-break:break-all;white-space:pre-wrap}
.logbar{display:flex;gap:1em;align-items:center;margin-bottom:.3em}
pre{background:rgba(127,127,127,.1);padding:.5em;margin:0;max-height:50vh;overflow:auto;
  white-space:pre-wrap;word-break:break-all;font-size:12px}
button.danger{color:var(--err)}
#error{color:var(--err);padding:0 1em}
dialog{border:1px solid var(--line);border-radius:.4em;background:var(--bg);color:var(--fg)}
dialog .row{display:flex;gap:.5em;justify-content:flex-end;margin-top:.8em}
"""

_PAGE_JS = """\
"use strict";
// pman's status page.  Every API call carries the token, kept for this tab
// only (sessionStorage); the table follows /api/v1/events, which names the
// jobs that changed and brings their objects: nothing unchanged is fetched
// again, and a whole page of jobs is read only on a filter change or reset.
const PAGE = 100, WAIT = 25, LOG_CHUNK = 1 << 20, LOG_KEEP = 1 << 19, GROUPS_EVERY = 2000;
const STATUSES = __STATUSES__;     // pman.STATUSES
const $ = (id) => document.getElementById(id);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
let token = sessionStorage.getItem("pman-token");
let tokenWait = null;
let seq = null;                  // the feed's cursor
let rows = new Map();            // jid -> job object shown
let more = false;                // more matching jobs than shown
let filter = {status: "", auid: "", text: ""};
let epoch = 0;                   // bumped by a filter change: stale pages are dropped
let inflight = null;             // changes seen while a page is read: applied to it after
let selected = null;              // the jid shown in the detail pane
let logGen = 0;

function askToken(refused) {
  if (!tokenWait) {
    tokenWait = new Promise((resolve) => {
      $("t-why").textContent = refused ? "That token was refused." : "";
      $("t-input").value = "";
      $("token").showModal();
      $("t-form").onsubmit = (e) => {
        e.preventDefault();
        const v = $("t-input").value.trim();
        if (!v) return;
        token = v;
        sessionStorage.setItem("pman-token", v);
        $("token").close();
        tokenWait = null;
        resolve();
      };
    });
  }
  return tokenWait;
}

async function api(method, path, body) {
  for (;;) {
    const headers = {};
    if (token) headers.Authorization = "Bearer " + token;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const r = await fetch(path, {method, headers, cache: "no-store", credentials: "omit",
                                 body: body === undefined ? undefined : JSON.stringify(body)});
    if (r.status === 401) { await askToken(!!token); continue; }
    if (r.status === 204) return null;
    const obj = await r.json();
    if (!r.ok) throw new Error(obj.message || r.statusText);
    return obj;
  }
}

function matches(j) {
  if (filter.status && j.status !== filter.status) return false;
  if (filter.auid && j.auid !== filter.auid) return false;
  if (filter.text) {
    const t = filter.text.toLowerCase();
    const fields = [j.jid, j.cmd, j.auid, j.message];
    if (!fields.some((s) => (s || "").toLowerCase().includes(t))) return false;
  }
  return true;
}

function showCounts(counts) {
  const box = $("counts");
  if (!box.childElementCount) {
    for (const s of STATUSES) {
      const b = document.createElement("button");
      b.type = "button"; b.dataset.status = s; b.className = s;
      b.append(s, document.createElement("b"));
      b.onclick = () => { $("f-status").value = filter.status === s ? "" : s; filtersChanged(); };
      box.append(b);
    }
  }
  for (const b of box.children) {
    b.lastChild.textContent = counts[b.dataset.status];
    b.classList.toggle("on", filter.status === b.dataset.status);
  }
  $("total").textContent = Object.values(counts).reduce((a, b) => a + b, 0) + " jobs";
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text == null ? "" : String(text);
  if (cls) td.className = cls;
  tr.append(td);
}

function render() {
  const list = [...rows.values()].sort((a, b) => b.seq - a.seq);
  if (list.length > PAGE) {
    for (const j of list.splice(PAGE)) rows.delete(j.jid);
    more = true;
  }
  const body = document.createDocumentFragment();
  for (const j of list) {
    const tr = document.createElement("tr");
    tr.dataset.jid = j.jid;
    if (j.jid === selected) tr.className = "sel";
    cell(tr, j.jid); cell(tr, j.status, j.status); cell(tr, j.auid); cell(tr, j.cmd, "cmd");
    cell(tr, j.returncode); cell(tr, (j.submitted || "").replace("T", " ").slice(5, 19));
    if (j.waiting) cell(tr, j.waiting, "msg wait"); else cell(tr, j.message, "msg");
    tr.title = j.cmd;
    body.append(tr);
  }
  $("rows").replaceChildren(body);
  if (!performance.getEntriesByName("pman-first-rows").length) performance.mark("pman-first-rows");
  $("shown").textContent = !list.length ? "no job matches"
    : "newest " + list.length + (more ? " matching jobs shown" : " shown");
}

async function loadPage() {
  const mine = ++epoch;
  const q = new URLSearchParams({order: "newest", limit: String(PAGE)});
  if (filter.status) q.set("status", filter.status);
  if (filter.auid) q.set("auid", filter.auid);
  if (filter.text) q.set("q", filter.text);
  const seen = inflight = new Map();
  const page = await api("GET", "/api/v1/jobs?" + q);
  if (mine !== epoch) return;
  inflight = null;
  rows = new Map(page.jobs.map((j) => [j.jid, j]));
  more = page.next !== null;
  for (const c of seen.values()) apply(c);
  render();
}

function apply(change) {
  const j = change.job;
  if (inflight) inflight.set(change.jid, change);
  if (change.jid === selected) showRecord(j);
  if (!j || !matches(j)) { rows.delete(change.jid); return; }
  let oldest = Infinity;
  for (const r of rows.values()) oldest = Math.min(oldest, r.seq);
  if (rows.has(j.jid) || !more || j.seq > oldest) rows.set(j.jid, j);
}

function setLive(ok, why) {
  $("live").textContent = ok ? "live" : "reconnecting: " + why;
  $("live").className = ok ? "" : "off";
}

async function follow() {
  for (;;) {
    try {
      if (seq === null) {
        const f = await api("GET", "/api/v1/events");
        seq = f.seq;
        showCounts(f.counts);
        await loadPage();
        setLive(true);
        continue;
      }
      const f = await api("GET", "/api/v1/events?since=" + seq + "&wait=" + WAIT +
                               "&limit=" + PAGE);
      showCounts(f.counts);
      if (f.reset) { seq = f.seq; await loadPage(); continue; }
      for (const c of f.changes) apply(c);
      seq = f.seq;
      if (f.changes.length) render();
      setLive(true);
      if (f.busy) await sleep(2000 + Math.random() * 2000);
    } catch (e) {
      setLive(false, e.message);
      await sleep(2000);
    }
  }
}

// Group state is not in the job feed (a pause changes no job): read it
// every GROUPS_EVERY ms.  A pause or a limit changes why jobs wait, so a
// change of them reads the page of jobs again.
async function followGroups() {
  let settings = null;
  for (;;) {
    try {
      const g = await api("GET", "/api/v1/groups");
      const now = JSON.stringify([g.paused, g.groups.filter((x) => x.paused ||
        x.max_running !== null).map((x) => [x.name, x.max_running, x.paused])]);
      if (settings !== null && now !== settings) await loadPage();
      settings = now;
      $("paused").hidden = !g.paused;
      $("groups").replaceChildren(...g.groups.map((x) => {
        const span = document.createElement("span");
        span.dataset.group = x.name;
        span.className = x.paused ? "paused" : "";
        span.textContent = x.name + ": " + x.running + "/" +
          (x.max_running === null ? "any" : x.max_running) + " running, " + x.waiting +
          " waiting" + (x.paused ? ", paused" : "");
        return span;
      }));
    } catch (e) {
      // follow() reports the connection's state
    }
    await sleep(GROUPS_EVERY);
  }
}

function filtersChanged() {
  filter = {status: $("f-status").value, auid: $("f-auid").value.trim(),
            text: $("f-text").value.trim()};
  for (const b of $("counts").children) {
    b.classList.toggle("on", filter.status === b.dataset.status);
  }
  loadPage().catch((e) => setLive(false, e.message));
}

let typing = null;
function typed() { clearTimeout(typing); typing = setTimeout(filtersChanged, 250); }

const FIELDS = ["status", "waiting", "message", "returncode", "pid", "cmd", "auid", "group",
                "priority", "after", "after_any", "begin", "hold", "retries", "attempts",
                "submitted", "started", "ended", "assigned", "usage", "timeout", "cwd", "meta",
                "env", "image"];
const DEFAULTS = {group: "default", priority: 0, hold: false, retries: 0};   // not shown

function showRecord(j) {
  const dl = $("d-record");
  dl.replaceChildren();
  if (!j) {
    const dd = document.createElement("dd");
    dd.textContent = "this job was deleted";
    dl.append(dd);
    $("d-kill").disabled = $("d-delete").disabled = true;
    return;
  }
  for (const k of FIELDS) {
    const v = j[k];
    if (v === undefined || v === null || v === "") continue;
    if (typeof v === "object" && !Object.keys(v).length) continue;
    if (v === DEFAULTS[k]) continue;
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = k;
    dd.textContent = typeof j[k] === "object" ? JSON.stringify(j[k]) : String(j[k]);
    if (k === "status") dd.className = j[k];
    dl.append(dt, dd);
  }
  $("d-kill").disabled = !(j.status === "notstarted" || j.status === "started");
  $("d-delete").disabled = false;
}

function select(jid) {
  selected = jid;
  $("detail").hidden = false;
  $("d-jid").textContent = jid;
  for (const tr of $("rows").children) tr.classList.toggle("sel", tr.dataset.jid === jid);
  showRecord(rows.get(jid));
  followLog();
}

async function followLog() {
  const mine = ++logGen, jid = selected, stream = $("d-stream").value, pre = $("d-log");
  let offset = 0, text = "";
  pre.textContent = "";
  $("d-logstate").textContent = "reading";
  while (mine === logGen) {
    let r;
    try {
      r = await api("GET", "/api/v1/" + encodeURIComponent(jid) + "/logs?stream=" + stream +
                    "&offset=" + offset + "&limit=" + LOG_CHUNK);
    } catch (e) {
      if (mine === logGen) $("d-logstate").textContent = e.message;
      return;
    }
    if (mine !== logGen) return;
    if (r.data) {
      const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      text = (text + r.data).slice(-LOG_KEEP);
      pre.textContent = text;
      if (atEnd) pre.scrollTop = pre.scrollHeight;
    }
    offset = r.next_offset;
    if (r.eof) { $("d-logstate").textContent = "ended (" + offset + " bytes)"; return; }
    $("d-logstate").textContent = "following (" + offset + " bytes)";
    if (r.next_offset - r.offset < LOG_CHUNK) await sleep(500);
  }
}

function confirmThen(text, label, action) {
  $("c-text").textContent = text;
  $("c-ok").textContent = label;
  $("c-ok").onclick = async () => {
    $("confirm").close();
    try {
      await action();
    } catch (e) {
      $("error").hidden = false;
      $("error").textContent = e.message;
    }
  };
  $("confirm").showModal();
}

$("c-cancel").onclick = () => $("confirm").close();
$("token").oncancel = (e) => e.preventDefault();
const jobPath = () => "/api/v1/" + encodeURIComponent(selected) + "/";
$("d-kill").onclick = () => confirmThen(
  "Kill job " + selected + " (SIGTERM, then SIGKILL after the grace period)?",
  "Kill", () => api("POST", jobPath() + "kill", {}));
$("d-delete").onclick = () => confirmThen(
  "Delete job " + selected + " and its logs? A running job is killed first.",
  "Delete", () => api("DELETE", jobPath()));
$("d-close").onclick = () => { selected = null; logGen++; $("detail").hidden = true; render(); };
$("d-stream").onchange = followLog;
$("rows").onclick = (e) => { const tr = e.target.closest("tr"); if (tr) select(tr.dataset.jid); };
$("f-status").onchange = filtersChanged;
$("f-auid").oninput = typed;
$("f-text").oninput = typed;
$("filters").onsubmit = (e) => e.preventDefault();
for (const s of STATUSES) $("f-status").append(new Option(s, s));
follow();
followGroups();
"""

_PAGE_HTML = """\
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>pman</title>
<link rel="icon" href="data:,">
<style>%(css)s</style>
</head>
<body>
<header class="top">
  <h1>pman</h1><span class="mut">%(version)s</span><span id="total" class="mut"></span>
  <span id="live">connecting</span><span id="paused" hidden>manager paused</span>
</header>
<section id="counts" aria-label="jobs per status"></section>
<section id="groups" aria-label="groups"></section>
<form id="filters" role="search">
  <label>Status <select id="f-status"><option value="">any</option></select></label>
  <label>auid <input id="f-auid" autocomplete="off" size="12"></label>
  <label>Text <input id="f-text" type="search" placeholder="jid, command, message" size="24">
  </label>
</form>
<p id="error" role="alert" hidden></p>
<div class="wrap">
<main>
<table id="jobs">
  <thead><tr><th>jid</th><th>status</th><th>auid</th><th>command</th><th>code</th>
    <th>submitted</th><th>message</th></tr></thead>
  <tbody id="rows"></tbody>
</table>
<p id="shown" class="mut"></p>
</main>
<aside id="detail" hidden>
  <header>
    <h2 id="d-jid"></h2>
    <button type="button" id="d-kill" class="danger">Kill</button>
    <button type="button" id="d-delete" class="danger">Delete</button>
    <button type="button" id="d-close">Close</button>
  </header>
  <dl id="d-record"></dl>
  <div class="logbar">
    <select id="d-stream" aria-label="log stream"><option>stdout</option><option>stderr</option>
    </select><span id="d-logstate" class="mut"></span>
  </div>
  <pre id="d-log"></pre>
</aside>
</div>
<dialog id="confirm">
  <p id="c-text"></p>
  <div class="row"><button type="button" id="c-cancel">Cancel</button>
    <button type="button" id="c-ok" class="danger">OK</button></div>
</dialog>
<dialog id="token">
  <form id="t-form">
    <p>This server needs its token.</p><p id="t-why" class="mut"></p>
    <input id="t-input" type="password" autocomplete="off" aria-label="token" size="30">
    <div class="row"><button id="t-ok">Use token</button></div>
  </form>
</dialog>
<script>%(js)s</script>
</body>
</html>
"""


def _page():
    def digest(text):
        return "'sha256-%s'" % base64.b64encode(hashlib.sha256(text.encode("utf-8"))
                                                .digest()).decode("ascii")
    js = _PAGE_JS.replace("__STATUSES__", json.dumps(STATUSES))
    csp = ("default-src 'none'; script-src %s; style-src %s; connect-src 'self'; "
           "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
           % (digest(js), digest(_PAGE_CSS)))
    html = _PAGE_HTML % {"css": _PAGE_CSS, "js": js, "version": "pman " + __version__}
    return _Encoded(html.encode("utf-8"), "text/html; charset=utf-8",
                    (("Content-Security-Policy", csp), ("X-Content-Type-Options", "nosniff"),
                     ("Referrer-Policy", "no-referrer"), ("Cache-Control", "no-cache")))


_PAGE = _page()
_PAGE_PATHS = frozenset({"/", "/ui", "/ui/"})


if __name__ == "__main__":
    sys.exit(main())
