"""Shard leases: one writer per shard, on local disks and object stores alike.

A lease is a small JSON object ``leases/<shard>.json`` = {owner, host, pid, acquired, expires}.
It is created with an exclusive create (``open(..., "xb")``: ``O_EXCL`` on a local disk, a
conditional ``If-None-Match: *`` PUT on S3), so of two jobs racing for a shard exactly one
wins; the other moves on. The holder renews it (``renew``) while it writes and deletes it when
the shard is complete. A lease is broken, so a crashed job never blocks a shard for good, when
it has expired, or when its holder ran on this host and that process is gone (a SIGKILLed run
resumed on the same machine takes its shards back at once). Breaking is a delete followed by
the same exclusive create, so two jobs breaking one stale lease still end with one owner.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

LEASE_SECONDS = 600.0
_log = logging.getLogger("kdcache.store")


@dataclass(frozen=True)
class Holder:
    owner: str
    host: str
    pid: int
    expires: float

    def describe(self) -> str:
        return f"job {self.owner[:8]} (pid {self.pid} on {self.host}) until {time.strftime('%H:%M:%S', time.localtime(self.expires))}"


def new_owner() -> str:
    return uuid.uuid4().hex


class Leases:
    """The leases of one store. ``fs``/``root``: its fsspec filesystem and path."""

    def __init__(self, fs, root: str, *, owner: str, seconds: float = LEASE_SECONDS):
        self.fs, self.root, self.owner, self.seconds = fs, root.rstrip("/"), owner, seconds
        self.host, self.pid = socket.gethostname(), os.getpid()

    def _path(self, shard: str) -> str:
        return f"{self.root}/leases/{shard}.json"

    def _record(self) -> bytes:
        now = time.time()
        return json.dumps({"owner": self.owner, "host": self.host, "pid": self.pid, "acquired": now,
                           "expires": now + self.seconds}).encode()

    def holder(self, shard: str) -> Holder | None:
        """Who holds the lease of ``shard`` (None: nobody, or an unreadable lease)."""
        try:
            with self.fs.open(self._path(shard), "rb") as f:
                d = json.loads(f.read())
            return Holder(str(d["owner"]), str(d["host"]), int(d["pid"]), float(d["expires"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return Holder("?", "?", -1, 0.0)  # garbage (not written by kdcache): treated as expired

    def acquire(self, shard: str) -> Holder | None:
        """Take the lease; returns None when taken, else the live holder (we move on)."""
        for _ in range(2):
            if self._create(shard):
                return None
            h = self.holder(shard)
            if h is None:
                continue  # released between our create and our read
            if h.owner == self.owner:
                return None
            if not self._stale(h):
                return h
            self._delete(shard)  # expired or dead: break it, then race for it like anyone else
        h = self.holder(shard)
        return None if h is not None and h.owner == self.owner else h

    def renew(self, shard: str) -> bool:
        """Extend our lease; False if it is no longer ours (broken as stale by another job)."""
        h = self.holder(shard)
        if h is None or h.owner != self.owner:
            return False
        with self.fs.open(self._path(shard), "wb") as f:
            f.write(self._record())
        return True

    def release(self, shard: str) -> None:
        h = self.holder(shard)
        if h is not None and h.owner == self.owner:
            self._delete(shard)

    def all(self) -> dict[str, Holder]:
        """Every lease of the store (for ``kdcache store ls``)."""
        try:
            names = self.fs.ls(f"{self.root}/leases", detail=False)
        except FileNotFoundError:
            return {}
        out = {}
        for p in names:
            name = p.rstrip("/").rsplit("/", 1)[-1]
            if name.endswith(".json") and not name.endswith(".tmp"):
                h = self.holder(name[:-5])
                if h is not None:
                    out[name[:-5]] = h
        return out

    def _create(self, shard: str) -> bool:
        """Exclusive create, with the content in place the moment the object exists: a reader
        never sees an empty lease (which it would have to take for a broken one)."""
        path = self._path(shard)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if getattr(self.fs, "local_file", False) or type(self.fs).__name__ == "LocalFileSystem":
            tmp = f"{path}.{self.owner}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(self._record())
            try:
                os.link(tmp, path)  # fails if the lease exists: O_EXCL semantics, content included
                return True
            except FileExistsError:
                return False
            finally:
                os.remove(tmp)
        try:
            with self.fs.open(path, "xb") as f:  # S3: one conditional PUT (If-None-Match: *) with the body
                f.write(self._record())
            return True
        except FileExistsError:
            return False

    def _delete(self, shard: str) -> None:
        try:
            self.fs.rm(self._path(shard))
        except FileNotFoundError:
            pass

    def _stale(self, h: Holder) -> bool:
        if h.expires < time.time():
            return True
        # Same host: another owner under our own pid can only be a dead job whose pid we inherited
        # (pids are reused: a SIGKILLed run's pid may be the resuming run's).
        return h.host == self.host and (h.pid == self.pid or not pid_alive(h.pid))


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (one we may not signal exists too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def leases_for(url: str, owner: str, *, seconds: float = LEASE_SECONDS, pid: int | None = None) -> Leases:
    """Leases of the store at ``url``, on a filesystem opened here (safe in a forked worker)."""
    fs, root = _filesystem(url)
    leases = Leases(fs, root, owner=owner, seconds=seconds)
    if pid is not None:
        leases.pid = pid
    return leases


def _filesystem(url: str):
    import fsspec.core

    from .remote import is_url, local_path
    if is_url(url):
        return fsspec.core.url_to_fs(url)
    return fsspec.filesystem("file"), os.path.abspath(local_path(url))


class Heartbeat:
    """Renews the leases of the shards being written, every ``every`` seconds, in the background."""

    def __init__(self, leases, active: set[str], *, every: float):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(leases, active, every), name="kdcache-leases", daemon=True)
        self._thread.start()

    def _run(self, leases, active, every):
        while not self._stop.wait(every):
            for name in list(active):
                if not leases.renew(name):
                    _log.warning("shard %s: lease lost to another job (it was stale); this job's rows for it "
                                "will not be marked complete by the other writer's rules", name)

    def stop(self):
        self._stop.set()
        self._thread.join()
