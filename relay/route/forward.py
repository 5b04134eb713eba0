"""Hand each part of a transaction to its owner worker and wait for the acks.

Input: a ``Transaction`` accepted at intake.  Output: its parts durable in
their owners' spools, or an exception (and then no part is ever delivered).

Theory of operation.  The recipients are split by owner (route.shard).
A transaction whose only owner is this worker is one part, stored ready for
delivery: the commit is the whole answer.  Any other transaction (a single
remote owner included: its store may complete after we gave up waiting) is
a two-phase commit with this worker as coordinator:

1. every owner stores its part *held* (durable, but not deliverable);
2. when all have acked, the coordinator records its decision in its own
   spool (group committed like any write) and only then may intake say 250;
3. the coordinator tells the owners to release their parts (best effort:
   one frame that asks no answer);
4. an owner with a part held for long asks the coordinator: decided ->
   release; still in flight -> wait; otherwise (the coordinator crashed
   before deciding, so no 250 was sent) -> drop the part.

If any owner fails in phase 1, the held parts already stored are aborted.

The same sockets carry the claims of AMQP message keys: a consumer asks the
key's owner (route.shard.key_owner) to record its try before it submits the
message, and to forget it if the try fails (spool.seen says why).

Between workers, parts travel over a Unix stream socket per owner
(``run_dir/worker-N.sock``): frames of ``!II`` (header length, body length),
a JSON header and the raw body.  Requests carry ids and are answered out
of order, so one connection carries many concurrent stores and the owner's
group commit batches them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import struct
import time
from typing import Awaitable, Callable, Protocol

import orjson

from relay.errors import CorruptEntry, OwnerUnavailable, RelayError, SpoolError
from relay.model import LANES, TRANSACTIONAL, Part, Recipient, Transaction
from relay.route import shard

log = logging.getLogger("relay.route")

FRAME = struct.Struct("!II")
REQUEST_TIMEOUT = 30.0  # an owner that takes longer than this is treated as down
HELD_CHECK_INTERVAL = 5.0
HELD_GRACE = 10.0  # a held part younger than this is left to the normal release
# A decision is kept long after any owner could still ask about it: an owner
# down longer than this would take a pruned decision for "never decided".
DECISION_RETENTION = 30 * 86400.0


WIRE_VERSION = 1


class Store(Protocol):
    """What the router needs of its worker's spool (spool.store.Spool).

    Injected by the worker: the spool is a later stage than routing."""

    async def store(self, part: Part) -> None: ...
    async def decide(self, queue_id: str) -> None: ...
    async def release(self, queue_id: str) -> None: ...
    async def abort(self, queue_id: str) -> None: ...
    async def is_decided(self, queue_id: str) -> bool: ...
    async def held_parts(self, received_before: float) -> list[tuple[str, int]]: ...
    async def prune_decisions(self, older_than: float) -> None: ...


class IntakeKeys(Protocol):
    """What the router needs to answer for the AMQP message keys this
    worker owns (spool.seen.IntakeIndex)."""

    async def claim(self, key: str, queue_id: str, queue: str, fields: bytes,
                    pid: int) -> tuple[str, str] | None: ...
    async def forget(self, queue_id: str) -> None: ...


def envelope_of(part: Part) -> dict:
    """A part's envelope as plain data for the wire (the body goes beside it)."""
    return {
        "v": WIRE_VERSION,
        "id": part.queue_id,
        "from": part.sender,
        "at": part.received_at,
        "utf8": part.smtputf8,
        "trace": part.trace,
        "lane": part.lane,
        "campaign": part.campaign,
        "tenant": part.tenant,
        "coord": part.coordinator,
        "rcpt": [[r.address, r.domain, r.slot, r.index] for r in part.recipients],
    }


def part_from(envelope: dict, body: bytes) -> Part:
    """The part a peer sent; CorruptEntry unless every field has its type."""
    try:
        if envelope["v"] != WIRE_VERSION:
            raise CorruptEntry(f"unknown part format version {envelope['v']!r}")
        fields_ok = (
            isinstance(envelope["id"], str) and isinstance(envelope["from"], str)
            and isinstance(envelope["at"], (int, float)) and isinstance(envelope["utf8"], bool)
            and (envelope["coord"] is None or isinstance(envelope["coord"], int))
            and all(isinstance(envelope.get(k, ""), str) for k in ("lane", "campaign", "tenant"))
            and envelope.get("lane", TRANSACTIONAL) in LANES
            and envelope["rcpt"]
            and all(
                isinstance(a, str) and isinstance(d, str) and isinstance(s, int)
                and isinstance(i, int) for a, d, s, i in envelope["rcpt"]
            )
        )
        if not fields_ok:
            raise CorruptEntry("part envelope with a field of the wrong type")
        return Part(
            queue_id=envelope["id"],
            sender=envelope["from"],
            recipients=tuple(Recipient(a, d, s, i) for a, d, s, i in envelope["rcpt"]),
            body=body,
            received_at=envelope["at"],
            smtputf8=envelope["utf8"],
            trace=bool(envelope.get("trace", False)),
            # Absent from a peer of an older relay (a rolling restart): its defaults.
            lane=envelope.get("lane", TRANSACTIONAL),
            campaign=envelope.get("campaign", ""),
            tenant=envelope.get("tenant", ""),
            coordinator=envelope["coord"],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptEntry(f"undecodable part envelope: {exc}") from None


def socket_path(run_dir: str, worker: int) -> str:
    return os.path.join(run_dir, f"worker-{worker}.sock")


def request_blocking(path: str, header: dict, timeout: float) -> dict:
    """One request to a worker from outside its event loop (the supervisor)."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        encoded = orjson.dumps({**header, "rid": 1})
        sock.sendall(FRAME.pack(len(encoded), 0) + encoded)
        data = b""
        while len(data) < FRAME.size:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("worker closed the connection")
            data += chunk
        header_len, _ = FRAME.unpack_from(data)
        while len(data) < FRAME.size + header_len:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("worker closed the connection")
            data += chunk
        return orjson.loads(data[FRAME.size:FRAME.size + header_len])


class FrameWriter:
    """Frames out on one connection, those of one turn of the event loop in
    one write (writev) at its end: a worker's stores to a peer come from
    many intake sessions at once, and the owner's acks from one group
    commit, so one system call carries many of them (each was two)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._chunks: list[bytes] = []

    def send(self, header: dict, body: bytes = b"") -> None:
        encoded = orjson.dumps(header)
        if not self._chunks:
            asyncio.get_running_loop().call_soon(self._flush)
        self._chunks.append(FRAME.pack(len(encoded), len(body)) + encoded)
        if body:
            self._chunks.append(body)

    def _flush(self) -> None:
        chunks, self._chunks = self._chunks, []
        if chunks and not self._writer.is_closing():
            self._writer.writelines(chunks)

    async def drain(self) -> None:
        """Raises when the connection is lost; waits while the peer lags."""
        await self._writer.drain()

    def is_closing(self) -> bool:
        return self._writer.is_closing()

    def close(self) -> None:
        self._flush()  # the frames of this turn (a last release) go before the close
        self._writer.close()


async def _write_frame(writer: FrameWriter, header: dict, body: bytes = b"") -> None:
    writer.send(header, body)
    await writer.drain()


async def _read_frame(reader: asyncio.StreamReader) -> tuple[dict, bytes]:
    header_len, body_len = FRAME.unpack(await reader.readexactly(FRAME.size))
    header = orjson.loads(await reader.readexactly(header_len))
    body = await reader.readexactly(body_len) if body_len else b""
    return header, body


class PeerClient:
    """Requests to one other worker over one multiplexed connection.

    Each request is remembered with the connection it went out on, so when
    a connection breaks exactly its own requests fail at once (the caller
    answers 451), however soon a new connection replaced it."""

    def __init__(self, owner: int, path: str) -> None:
        self.owner = owner
        self.path = path
        self._writer: FrameWriter | None = None
        self._reader_tasks: set[asyncio.Task] = set()
        self._pending: dict[int, tuple[asyncio.Future, FrameWriter]] = {}
        self._ids = itertools.count(1)
        self._connecting = asyncio.Lock()

    async def request(self, header: dict, body: bytes = b"") -> dict:
        writer = await self._connection()
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (future, writer)
        try:
            await _write_frame(writer, {**header, "rid": request_id}, body)
            async with asyncio.timeout(REQUEST_TIMEOUT):  # no task per request, unlike wait_for
                return await future
        except (OSError, asyncio.TimeoutError) as exc:
            self._pending.pop(request_id, None)  # answered here, not by _fail
            self._fail(writer, exc)
            raise OwnerUnavailable(f"worker {self.owner} did not answer") from None
        finally:
            self._pending.pop(request_id, None)

    def notify(self, header: dict) -> bool:
        """Send a frame that asks no answer, on the open connection; False
        when there is none (the caller makes it a request instead)."""
        writer = self._writer
        if writer is None or writer.is_closing():
            return False
        writer.send(header)
        return True

    async def connected(self) -> None:
        """Connect now if not connected (OwnerUnavailable if it cannot)."""
        await self._connection()

    async def _connection(self) -> FrameWriter:
        async with self._connecting:
            if self._writer is None or self._writer.is_closing():
                try:
                    reader, stream = await asyncio.open_unix_connection(self.path)
                except OSError:
                    raise OwnerUnavailable(f"worker {self.owner} is not reachable") from None
                writer = self._writer = FrameWriter(stream)
                task = asyncio.create_task(self._read_replies(reader, writer))
                self._reader_tasks.add(task)
                task.add_done_callback(self._reader_tasks.discard)
            return self._writer

    async def _read_replies(self, reader: asyncio.StreamReader, writer: FrameWriter) -> None:
        try:
            while True:
                header, _ = await _read_frame(reader)
                entry = self._pending.get(header.get("rid"))
                if entry is not None and not entry[0].done():
                    entry[0].set_result(header)
        except (OSError, asyncio.IncompleteReadError, orjson.JSONDecodeError) as exc:
            self._fail(writer, exc)

    def _fail(self, writer: FrameWriter, exc: BaseException) -> None:
        """A connection broke: every request that went out on it failed."""
        writer.close()
        if self._writer is writer:
            self._writer = None
        for future, sent_on in self._pending.values():
            if sent_on is writer and not future.done():
                future.set_exception(OwnerUnavailable(f"worker {self.owner} went away"))

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for task in list(self._reader_tasks):
            task.cancel()


class Router:
    """The worker's side of routing: submit transactions, serve peers."""

    def __init__(self, worker: int, workers: int, spool: Store, run_dir: str,
                 keys: IntakeKeys | None = None, hosts: int = 1, host: int = 0,
                 spread: frozenset[str] = frozenset()) -> None:
        self.worker = worker
        self.workers = workers
        self.hosts = hosts  # [cluster]: the slots of other hosts go through the broker
        self.host = host
        self.spread = spread  # [relay] spread_domains: their recipients are hashed by address
        # async (host, Part) -> None, raising OwnerUnavailable when the broker
        # did not confirm (route.cluster.ClusterLink.publish); set by the worker.
        self.publish: Callable[[int, Part], Awaitable[None]] | None = None
        self.spool = spool
        self.keys = keys  # the AMQP message keys this worker owns
        self.run_dir = run_dir
        self.peers = {
            owner: PeerClient(owner, socket_path(run_dir, owner))
            for owner in range(workers)
            if owner != worker
        }
        self.in_flight: set[str] = set()  # transactions this worker coordinates now
        self._server: asyncio.AbstractServer | None = None
        self._background: set[asyncio.Task] = set()
        self._held_task: asyncio.Task | None = None
        self.peers_done: set[int] = set()  # peers that will hand over no more parts (drain)
        # Answers operator commands (relayctl) that reach this worker's socket.
        self.control: Callable[[dict], Awaitable[dict]] | None = None

    # -- intake side ------------------------------------------------------

    async def submit(self, txn: Transaction) -> None:
        """Store every part durably; raises RelayError if any owner fails.

        In a cluster, the parts of other hosts are published first (each
        confirmed by the broker), then this host's are stored: when the
        broker is down nothing is stored here, so the client's retry after
        the 451 makes no duplicate.  (A local store failing after the
        publishes leaves the other hosts' parts on their way: the retry
        sends those twice.)"""
        recipients = [shard.recipient(address, i, self.spread, self.hosts)
                      for i, address in enumerate(txn.recipients)]
        if self.hosts > 1:
            by_host = shard.split_hosts(recipients, self.hosts)
            here = by_host.pop(self.host, [])
            if by_host:
                if self.publish is None:
                    raise OwnerUnavailable("the cluster's broker is not connected yet")
                results = await asyncio.gather(
                    *(self.publish(host, self._part(txn, tuple(rcpts), None))
                      for host, rcpts in by_host.items()),
                    return_exceptions=True)
                failed = [r for r in results if isinstance(r, BaseException)]
                if failed:
                    raise next((f for f in failed if not isinstance(f, RelayError)), failed[0])
            if here:
                await self.submit_here(txn, here)
            return
        await self.submit_here(txn, recipients)

    async def submit_here(self, txn: Transaction, recipients: list[Recipient]) -> None:
        """Store the parts of this host's recipients in their owners' spools."""
        groups = shard.split(recipients, self.workers, self.hosts)
        if list(groups) == [self.worker]:
            # Only this worker's own spool: its commit is the whole answer.
            await self._store(self.worker, self._part(txn, groups[self.worker], coordinator=None))
            return
        # Another worker is involved: even a single remote part is stored
        # held, so a store that completes after we gave up (timeout, a
        # dropped connection) is never delivered without our decision.
        parts = {owner: self._part(txn, rcpts, self.worker) for owner, rcpts in groups.items()}
        self.in_flight.add(txn.queue_id)
        try:
            results = await self._store_each(parts)
            failed = [r for r in results if isinstance(r, BaseException)]
            if not failed:
                try:
                    await self.spool.decide(txn.queue_id)
                except RelayError as exc:
                    failed.append(exc)
            if failed:
                for owner, result in zip(parts, results):
                    if not isinstance(result, BaseException):
                        self._in_background(self._send(owner, "abort", txn.queue_id))
                for exc in failed:
                    if not isinstance(exc, RelayError):
                        raise exc
                raise failed[0]
        finally:
            self.in_flight.discard(txn.queue_id)
        for owner in parts:
            self._release(owner, txn.queue_id)

    async def _store_each(self, parts: dict[int, Part]) -> list:
        """Each owner's store at once: None or the exception, in order."""
        if len(parts) == 1:  # the usual case: no task for it (gather makes one each)
            [(owner, part)] = parts.items()
            try:
                await self._store(owner, part)
            except Exception as exc:  # noqa: BLE001 - handed back, as gather's are
                return [exc]
            return [None]
        return await asyncio.gather(*(self._store(owner, part) for owner, part in parts.items()),
                                    return_exceptions=True)

    @staticmethod
    def _part(txn: Transaction, recipients, coordinator: int | None) -> Part:
        return Part(
            queue_id=txn.queue_id,
            sender=txn.sender,
            recipients=recipients,
            body=txn.body,
            received_at=txn.received_at,
            smtputf8=txn.smtputf8,
            trace=txn.trace,
            lane=txn.lane,
            campaign=txn.campaign,
            tenant=txn.tenant,
            coordinator=coordinator,
        )

    async def _store(self, owner: int, part: Part) -> None:
        if owner == self.worker:
            await self.spool.store(part)
            return
        reply = await self.peers[owner].request(
            {"op": "store", "part": envelope_of(part)}, part.body
        )
        if not reply.get("ok"):
            raise SpoolError(f"worker {owner} could not store its part")

    def _release(self, owner: int, queue_id: str) -> None:
        """Tell an owner its part may go out.  To a peer, one frame that
        asks no answer, on the open connection (the one its store went out
        on, unless that broke since): no task, reply or timer per message.
        A release lost with its connection is settled by the owner's
        held-part check, as a failed request was."""
        peer = self.peers.get(owner)
        if peer is None or not peer.notify({"op": "release", "id": queue_id}):
            self._in_background(self._send(owner, "release", queue_id))

    async def _send(self, owner: int, op: str, queue_id: str) -> str | None:
        """release / abort / status of a transaction at a worker (maybe this one)."""
        if owner == self.worker:
            return await self._local(op, queue_id)
        reply = await self.peers[owner].request({"op": op, "id": queue_id})
        return reply.get("status")

    async def _local(self, op: str, queue_id: str) -> str | None:
        if op == "release":
            await self.spool.release(queue_id)
        elif op == "abort":
            await self.spool.abort(queue_id)
        elif op == "status":
            if queue_id in self.in_flight:
                return "pending"
            return "decided" if await self.spool.is_decided(queue_id) else "aborted"
        return None

    def _in_background(self, coro) -> None:
        async def run():
            try:
                await coro
            except RelayError as exc:  # the held-part check settles it later
                log.info("deferred to the held-part check: %s", exc)

        task = asyncio.create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- AMQP message keys ------------------------------------------------

    async def claim_key(self, key: str, queue_id: str, queue: str,
                        fields: bytes) -> tuple[str, str] | None:
        """Ask the key's owner to record this worker's try of an AMQP
        message: None if the try may store it, else (state, queue id) of the
        try that holds the key (spool.seen.IntakeIndex.claim)."""
        owner = shard.key_owner(key, self.workers)
        if owner == self.worker:
            return await self._keys().claim(key, queue_id, queue, fields, os.getpid())
        reply = await self.peers[owner].request(
            {"op": "claim_key", "key": key, "id": queue_id, "queue": queue, "pid": os.getpid()},
            fields,
        )
        if not reply.get("ok"):
            raise SpoolError(f"worker {owner} could not record a message key")
        holder = reply.get("holder")
        return (holder[0], holder[1]) if holder else None

    async def forget_key(self, key: str, queue_id: str) -> None:
        """A try that failed gives its key back to the key's owner."""
        owner = shard.key_owner(key, self.workers)
        if owner == self.worker:
            await self._keys().forget(queue_id)
            return
        reply = await self.peers[owner].request({"op": "forget_key", "id": queue_id})
        if not reply.get("ok"):
            raise SpoolError(f"worker {owner} could not drop a message key")

    def _keys(self) -> IntakeKeys:
        if self.keys is None:
            raise SpoolError("this worker records no AMQP message keys")
        return self.keys

    # -- owner side ---------------------------------------------------------

    async def serve(self) -> None:
        path = socket_path(self.run_dir, self.worker)
        os.makedirs(self.run_dir, exist_ok=True)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self._server = await asyncio.start_unix_server(self._serve_peer, path=path)
        self._held_task = asyncio.create_task(self._settle_held_parts())

    async def _serve_peer(self, reader: asyncio.StreamReader, stream: asyncio.StreamWriter) -> None:
        writer = FrameWriter(stream)
        tasks: set[asyncio.Task] = set()
        try:
            while True:
                header, body = await _read_frame(reader)
                if "rid" not in header:  # asks no answer: a coordinator's release
                    self._noted(header)
                    continue
                task = asyncio.create_task(self._answer(writer, header, body))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except (asyncio.IncompleteReadError, OSError, orjson.JSONDecodeError):
            pass
        except asyncio.CancelledError:
            pass  # the worker is stopping; this handler is the top of its task
        finally:
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            writer.close()

    def _noted(self, header: dict) -> None:
        queue_id = header.get("id")
        if header.get("op") == "release" and isinstance(queue_id, str):
            self._in_background(self.spool.release(queue_id))
        else:
            log.warning("a peer's frame that asks no answer ignored: %r", header)

    async def _answer(self, writer: FrameWriter, header: dict, body: bytes) -> None:
        reply = {"rid": header.get("rid"), "ok": True}
        try:
            if header["op"] == "store":
                await self.spool.store(part_from(header["part"], body))
            elif header["op"] == "claim_key":
                holder = await self._keys().claim(header["key"], header["id"], header["queue"],
                                                  body, header["pid"])
                reply["holder"] = list(holder) if holder else None
            elif header["op"] == "forget_key":
                await self._keys().forget(header["id"])
            elif header["op"] == "done":
                self.peers_done.add(header["from"])
            elif header["op"] in ("release", "abort", "status"):
                reply["status"] = await self._local(header["op"], header["id"])
            elif self.control is not None:  # an operator's command, from the supervisor
                reply.update(await self.control(header))
            else:
                raise CorruptEntry(f"unknown request {header['op']!r}")
        except (RelayError, KeyError, TypeError, ValueError) as exc:  # CorruptEntry included
            log.warning("request %s from a peer failed: %s", header.get("op"), exc)
            reply["ok"] = False
        try:
            await _write_frame(writer, reply)
        except OSError:
            pass  # the requester went away; it treats the request as failed

    async def _settle_held_parts(self) -> None:
        """Ask coordinators about parts held too long (step 4 above)."""
        while True:
            await asyncio.sleep(HELD_CHECK_INTERVAL)
            try:
                held = await self.spool.held_parts(time.time() - HELD_GRACE)
            except RelayError as exc:
                log.info("held-part check postponed: %s", exc)
                continue
            for queue_id, coordinator in held:
                if coordinator is None or coordinator >= self.workers:
                    continue  # settled by the supervisor's recovery at next start
                try:
                    status = await self._send(coordinator, "status", queue_id)
                    if status == "decided":
                        await self.spool.release(queue_id)
                    elif status == "aborted":
                        log.info("%s: dropping a held part its coordinator never decided", queue_id)
                        await self.spool.abort(queue_id)
                except RelayError as exc:  # that coordinator is down: ask again later
                    log.info("%s: held part not settled yet: %s", queue_id, exc)
            try:
                await self.spool.prune_decisions(time.time() - DECISION_RETENTION)
            except RelayError as exc:
                log.info("pruning decisions postponed: %s", exc)

    async def announce_done(self) -> None:
        """Drain: tell every peer this worker hands over no more parts."""
        for peer in self.peers.values():
            try:
                await peer.request({"op": "done", "from": self.worker})
            except RelayError:
                pass  # a peer that is gone needs no notice

    async def wait_peers_reachable(self, timeout: float) -> bool:
        """Start-up: wait (bounded) until every peer worker takes a connection."""
        deadline = time.monotonic() + timeout
        waiting = set(self.peers)
        while waiting:
            for owner in list(waiting):
                try:
                    await self.peers[owner].connected()
                    waiting.discard(owner)
                except OwnerUnavailable:
                    pass
            if not waiting or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        return not waiting

    async def wait_peers_done(self, timeout: float) -> bool:
        """Drain: serve peers until each said it is done (or the timeout)."""
        deadline = time.monotonic() + timeout
        while not self.peers_done >= set(self.peers) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.peers_done >= set(self.peers)

    async def close(self) -> None:
        if self._held_task is not None:
            self._held_task.cancel()
        if self._server is not None:
            self._server.close()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        for peer in self.peers.values():
            await peer.close()
