"""Tail an audit log with a persisted, rotation-safe position.

The position is (device, inode, offset of the *next* byte to read) and is
written only by :meth:`AuditTailer.commit`, after the caller has produced the
batch: a crash between reading and committing replays that batch, never skips it.

Rotation is handled both ways logrotate/auditd do it:

* *rename + create* (auditd's ``audit.log`` → ``audit.log.1``): the open file's
  inode no longer matches the path; the old file is read to its end, then the
  new file is read from offset 0. On resume, a saved inode found at
  ``PATH.1`` is drained first.
* *copytruncate*: the file shrank below the saved offset; reading restarts at 0.

Only complete lines are returned; a partial last line waits for its newline.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator


class AuditTailer:
    """Read complete lines from *path*, resuming from *state_path*.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "audit.log").write_text("a\\nb\\npartial")
    >>> t = AuditTailer(d / "audit.log", d / "pos.json")
    >>> list(t.batches(follow=False))
    [['a', 'b']]
    >>> t.commit(); AuditTailer(d / "audit.log", d / "pos.json").position()[2]
    4
    """

    def __init__(self, path, state_path, chunk_size: int = 1 << 20):
        self.path = os.fspath(path)
        self.state_path = os.fspath(state_path)
        self.chunk_size = chunk_size
        self._fh = None
        self._ino = None
        self._dev = None
        self._offset = 0  # next byte to read in the open file (complete lines only)
        self._commit_pos = None  # position after the last yielded batch
        self._buf = b""
        state = self._load_state()
        if state:
            self._dev, self._ino, self._offset = state["dev"], state["ino"], state["offset"]

    # ------------------------------------------------------------------ state
    def _load_state(self) -> dict | None:
        try:
            with open(self.state_path) as fh:
                st = json.load(fh)
            return {"dev": int(st["dev"]), "ino": int(st["ino"]), "offset": int(st["offset"])}
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def position(self) -> tuple:
        """(dev, inode, offset) of the next line to read."""
        return (self._dev, self._ino, self._offset)

    def commit(self) -> None:
        """Persist the position after the last batch handed out (atomic rename)."""
        pos = self._commit_pos or (self._dev, self._ino, self._offset)
        if pos[1] is None:
            return
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({"dev": pos[0], "ino": pos[1], "offset": pos[2], "path": self.path}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.state_path)

    # ------------------------------------------------------------------ files
    def _open(self, path: str, offset: int) -> bool:
        try:
            fh = open(path, "rb")
        except FileNotFoundError:
            return False
        st = os.fstat(fh.fileno())
        if self._fh is not None:
            self._fh.close()
        self._fh, self._dev, self._ino = fh, st.st_dev, st.st_ino
        self._offset = offset if offset <= st.st_size else 0
        fh.seek(self._offset)
        self._buf = b""
        return True

    def _ensure_open(self) -> bool:
        if self._fh is not None:
            return True
        if self._ino is not None:
            # resume: the saved file may have been rotated away while we were down
            for cand in (self.path, self.path + ".1"):
                try:
                    st = os.stat(cand)
                except FileNotFoundError:
                    continue
                if st.st_ino == self._ino and st.st_dev == self._dev:
                    return self._open(cand, self._offset)
            return self._open(self.path, 0)
        return self._open(self.path, 0)

    def _rotated(self) -> str | None:
        """``"rotated"`` when the path names another file, ``"truncated"`` after copytruncate."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        if (st.st_ino, st.st_dev) != (self._ino, self._dev):
            return "rotated"
        if st.st_size < self._offset:  # copytruncate
            self._fh.seek(0)
            self._offset = 0
            self._buf = b""
            return "truncated"
        return None

    def _read_lines(self, max_lines: int) -> list[str]:
        out: list[str] = []
        while len(out) < max_lines:
            data = self._fh.read(self.chunk_size)
            if not data:
                break
            self._buf += data
            *complete, self._buf = self._buf.split(b"\n")
            for raw in complete:
                self._offset += len(raw) + 1
                out.append(raw.decode("utf-8", "replace"))
            if len(out) >= max_lines:
                break
        if len(out) > max_lines:
            # hand back the surplus: rewind to just after line max_lines
            extra = out[max_lines:]
            out = out[:max_lines]
            back = sum(len(x.encode("utf-8", "replace")) + 1 for x in extra)
            self._offset -= back
            self._fh.seek(self._offset)
            self._buf = b""
        else:
            # keep the partial tail unread so the file offset stays line-aligned
            self._fh.seek(self._offset)
            self._buf = b""
        return out

    # ------------------------------------------------------------------ API
    def batches(
        self,
        follow: bool = False,
        max_lines: int = 1000,
        poll_interval: float = 0.2,
        idle_timeout: float | None = None,
    ) -> Iterator[list[str]]:
        """Yield lists of complete lines; with *follow*, wait for more (until *idle_timeout*)."""
        idle_since = time.monotonic()
        while True:
            if not self._ensure_open():
                if not follow:
                    return
                time.sleep(poll_interval)
                continue
            lines = self._read_lines(max_lines)
            if lines:
                self._commit_pos = (self._dev, self._ino, self._offset)
                idle_since = time.monotonic()
                yield lines
                continue
            change = self._rotated()
            if change == "rotated":
                # old file fully drained (we just hit its EOF): switch to the new one
                self._open(self.path, 0)
                self._commit_pos = (self._dev, self._ino, self._offset)
                continue
            if change == "truncated":
                self._commit_pos = (self._dev, self._ino, 0)
                continue
            if not follow:
                return
            if idle_timeout is not None and time.monotonic() - idle_since > idle_timeout:
                return
            time.sleep(poll_interval)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
