"""The step journal of an ``iterate`` run with a ``.npy`` out (see :mod:`._steps`).

A page of JSON (the state's fingerprint: shape, dtype), then two slots written in turn, each a
small JSON record with a sequence number and a CRC, so that a torn write never loses the
record before it. A record also holds the machine's boot id: after a process crash the page
cache holds every write, after a restart only what was synced.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._chunks import PAGE_SIZE
from ._storage import fsync_dir, new_temp_file, unlink_quietly
from .errors import JournalMismatchError

MAGIC = "memmap-pool step journal"
VERSION = 1


def boot_id() -> str:
    """This boot of the machine: the page cache survives anything but a restart."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:  # pragma: no cover - not Linux
        return ""


@dataclass
class StepRecord:
    """What the journal says of a run: ``step`` is complete, and ``state`` names the file that
    holds it ("initial", "out", or a sibling buffer "a" or "b")."""

    step: int
    state: str
    durable: bool = False
    checkpoint: int = 1
    boot: str = ""
    seq: int = 0


class StepJournal:
    """The step journal beside an ``iterate`` output (see the module docstring)."""

    def __init__(self, path: str, fingerprint: dict[str, Any], record: StepRecord) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self.record = record
        self._fd: int | None = None

    @classmethod
    def create(cls, path: str, fingerprint: dict[str, Any], record: StepRecord) -> StepJournal:
        header = json.dumps({"magic": MAGIC, "version": VERSION, "state": fingerprint}).encode()
        fd, tmp = new_temp_file(path)
        try:
            with open(fd, "wb") as f:
                f.write(header.ljust(PAGE_SIZE - 1) + b"\n")
                f.write(bytes(2 * PAGE_SIZE))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            unlink_quietly(tmp)
            raise
        fsync_dir(path)
        journal = cls(path, fingerprint, record)
        journal.write(record, durable=True)
        return journal

    @classmethod
    def load(cls, path: str) -> StepJournal:
        """Raises: JournalMismatchError: not a step journal, or no readable record."""
        with open(path, "rb") as f:
            head = f.read(PAGE_SIZE)
            slots = [f.read(PAGE_SIZE), f.read(PAGE_SIZE)]
        try:
            meta = json.loads(head.decode())
        except ValueError:
            meta = None
        if not isinstance(meta, dict) or meta.get("magic") != MAGIC:
            msg = (
                f"{path} is not the step journal of an iterate run (a map_chunks journal, or "
                "another file); pass resume=False to start afresh"
            )
            raise JournalMismatchError(msg)
        records = [r for r in map(_read_slot, slots) if r is not None]
        if not records:
            msg = f"the step journal {path} holds no readable record; pass resume=False"
            raise JournalMismatchError(msg)
        return cls(path, dict(meta.get("state") or {}), max(records, key=lambda r: r.seq))

    def write(self, record: StepRecord, durable: bool) -> None:
        """Record ``record`` in the slot after the last one; fsync it if ``durable``."""
        record.seq = self.record.seq + 1
        record.durable = durable
        record.boot = boot_id()
        body = json.dumps(
            {
                k: getattr(record, k)
                for k in ("step", "state", "durable", "checkpoint", "boot", "seq")
            }
        ).encode()
        line = json.dumps({"crc": zlib.crc32(body), "record": json.loads(body)}).encode()
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY)
        os.pwrite(self._fd, line.ljust(PAGE_SIZE - 1) + b"\n", PAGE_SIZE * (1 + record.seq % 2))
        if durable:
            os.fdatasync(self._fd)
        self.record = record

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_slot(raw: bytes) -> StepRecord | None:
    try:
        data = json.loads(raw.decode())
        body = json.dumps(data["record"]).encode()
        if zlib.crc32(body) != data["crc"]:
            return None
        r = data["record"]
        return StepRecord(
            int(r["step"]), str(r["state"]), bool(r["durable"]), int(r["checkpoint"]),
            str(r["boot"]), int(r["seq"]),
        )  # fmt: skip
    except (ValueError, KeyError, TypeError):
        return None


def state_fingerprint(shape: tuple[int, ...], dtype: np.dtype[Any]) -> dict[str, Any]:
    return {"shape": list(shape), "dtype": repr(np.lib.format.dtype_to_descr(dtype))}
