"""relay.route.forward: the wire envelope and the Router's two-phase hand-over.

The spool is an in-memory fake of forward.Store; peers are other Routers in
the same event loop, talking over a Unix socket in a temporary directory
(no processes, no network).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import tempfile

import orjson
import pytest

from relay.errors import CorruptEntry, OwnerUnavailable, RelayError, SpoolError
from relay.model import Part, Recipient, Transaction
from relay.route import forward
from relay.route.forward import Router, envelope_of, part_from
from relay.route.shard import owner_of, recipient, slot_of

# Domains by owner when workers == 2 (checked in test_domains_by_owner).
OWNER0 = ["example.net", "c.example"]  # slots 416, 330
OWNER1 = ["example.com", "gmail.com"]  # slots 697, 479


def test_domains_by_owner():
    assert [owner_of(slot_of(d), 2) for d in OWNER0] == [0, 0]
    assert [owner_of(slot_of(d), 2) for d in OWNER1] == [1, 1]


class FakeStore:
    """In-memory forward.Store with the semantics of spool.store.Spool."""

    def __init__(self, *, fail_store: bool = False, fail_decide: bool = False) -> None:
        self.parts: dict[str, Part] = {}
        self.held: set[str] = set()
        self.decided: set[str] = set()
        self.calls: list[tuple[str, str]] = []
        self.fail_store = fail_store
        self.fail_decide = fail_decide

    async def store(self, part: Part) -> None:
        self.calls.append(("store", part.queue_id))
        await asyncio.sleep(0)
        if self.fail_store:
            raise SpoolError("disk on fire")
        if part.queue_id not in self.parts:
            self.parts[part.queue_id] = part
            if part.coordinator is not None:
                self.held.add(part.queue_id)

    async def decide(self, queue_id: str) -> None:
        self.calls.append(("decide", queue_id))
        if self.fail_decide:
            raise SpoolError("cannot decide")
        self.decided.add(queue_id)

    async def release(self, queue_id: str) -> None:
        self.calls.append(("release", queue_id))
        self.held.discard(queue_id)

    async def abort(self, queue_id: str) -> None:
        self.calls.append(("abort", queue_id))
        if queue_id in self.held:
            self.held.discard(queue_id)
            del self.parts[queue_id]

    async def is_decided(self, queue_id: str) -> bool:
        return queue_id in self.decided

    async def held_parts(self, received_before: float) -> list[tuple[str, int]]:
        return [(q, self.parts[q].coordinator) for q in self.held if self.parts[q].received_at < received_before]

    async def prune_decisions(self, older_than: float) -> None:
        pass

    def ops(self, name: str) -> list[str]:
        return [q for op, q in self.calls if op == name]


def txn(queue_id: str, recipients: list[str], body: bytes = b"Subject: x\r\n\r\nhi\r\n") -> Transaction:
    return Transaction(
        queue_id=queue_id, sender="s@sender.example", recipients=tuple(recipients), body=body,
        received_at=1700000000.5, smtputf8=False,
    )


@pytest.fixture
def run_dir():
    # Short path: a Unix socket path must fit in 108 bytes.
    path = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- the wire envelope -------------------------------------------------------------


def make_part(coordinator=None, smtputf8=False) -> Part:
    return Part(
        queue_id="18BC0F2A1B30001A2B",
        sender="" if coordinator else "s@x.example",
        recipients=(
            Recipient("a@example.com", "example.com", 697, 0),
            Recipient("ü@bücher.example", "xn--bcher-kva.example", 54, 3),
        ),
        body=b"body\r\n",
        received_at=1700000000.25,
        smtputf8=smtputf8,
        coordinator=coordinator,
    )


@pytest.mark.parametrize("coordinator, smtputf8", [(None, False), (0, True), (3, False)])
def test_envelope_round_trip(coordinator, smtputf8):
    part = make_part(coordinator, smtputf8)
    envelope = envelope_of(part)
    assert envelope["v"] == forward.WIRE_VERSION
    assert "body" not in envelope and b"body" not in orjson.dumps(envelope)
    assert part_from(envelope, part.body) == part
    # ... and through the JSON of the wire.
    assert part_from(orjson.loads(orjson.dumps(envelope)), part.body) == part


def test_class_and_campaign_travel_between_workers():
    part = dataclasses.replace(make_part(0), lane="bulk", campaign="spring", tenant="acme")
    assert part_from(orjson.loads(orjson.dumps(envelope_of(part))), part.body) == part


def test_a_peer_without_lanes_sends_transactional_mail():
    envelope = envelope_of(make_part())
    for key in ("lane", "campaign", "tenant"):
        del envelope[key]
    part = part_from(envelope, b"x")
    assert (part.lane, part.campaign, part.tenant) == ("transactional", "", "")


def _corrupt(**changes):
    envelope = envelope_of(make_part())
    for key, value in changes.items():
        if value is KeyError:
            del envelope[key]
        else:
            envelope[key] = value
    return envelope


@pytest.mark.parametrize(
    "envelope",
    [
        _corrupt(v=2),
        _corrupt(v="1"),
        _corrupt(v=KeyError),
        _corrupt(id=KeyError),
        _corrupt(**{"from": KeyError}),
        _corrupt(at=KeyError),
        _corrupt(utf8=KeyError),
        _corrupt(coord=KeyError),
        _corrupt(rcpt=KeyError),
        _corrupt(rcpt=None),
        _corrupt(rcpt=5),
        _corrupt(rcpt=[["a@b", "b", 1]]),
        _corrupt(rcpt=[["a@b", "b", 1, 0, "extra"]]),
        _corrupt(rcpt=[5]),
        _corrupt(lane="urgent"),
        _corrupt(campaign=7),
        None,
        [],
        "string",
        {},
    ],
)
def test_part_from_bad_input_is_corrupt_entry(envelope):
    with pytest.raises(CorruptEntry):
        part_from(envelope, b"x")


def test_corrupt_entry_is_a_spool_error():
    assert issubclass(CorruptEntry, SpoolError) and issubclass(OwnerUnavailable, RelayError)


# -- one worker ---------------------------------------------------------------------


def test_one_worker_stores_one_active_part():
    async def main():
        store = FakeStore()
        router = Router(0, 1, store, "/nonexistent")
        assert router.peers == {}
        await router.submit(txn("Q1", ["a@example.com", "b@Gmail.COM", "c@bücher.example"]))
        await router.close()
        return store, router

    store, router = asyncio.run(main())
    part = store.parts["Q1"]
    assert part.coordinator is None
    assert part.sender == "s@sender.example"
    assert part.body == b"Subject: x\r\n\r\nhi\r\n"
    assert part.received_at == 1700000000.5
    assert [(r.address, r.domain, r.index) for r in part.recipients] == [
        ("a@example.com", "example.com", 0),
        ("b@Gmail.COM", "gmail.com", 1),
        ("c@bücher.example", "xn--bcher-kva.example", 2),
    ]
    assert [r.slot for r in part.recipients] == [697, 479, 54]
    assert store.calls == [("store", "Q1")]  # no decide, no release
    assert store.held == set()
    assert router.in_flight == set()


def test_one_worker_store_failure_propagates():
    async def main():
        store = FakeStore(fail_store=True)
        router = Router(0, 1, store, "/nonexistent")
        with pytest.raises(SpoolError):
            await router.submit(txn("Q1", ["a@example.com"]))
        await router.close()
        return store

    store = asyncio.run(main())
    assert store.ops("abort") == [] and store.parts == {}


def test_smtputf8_flag_travels_to_the_part():
    async def main():
        store = FakeStore()
        router = Router(0, 1, store, "/nonexistent")
        t = Transaction("Q2", "ü@x.example", ("ü@bücher.example",), b"b\r\n", 1.0, smtputf8=True)
        await router.submit(t)
        return store

    part = asyncio.run(main()).parts["Q2"]
    assert part.smtputf8 is True and part.sender == "ü@x.example"


# -- two workers, owner 1 unreachable ---------------------------------------------


def test_owner_unavailable_aborts_the_local_held_part(run_dir):
    recipients = [f"u@{OWNER0[0]}", f"v@{OWNER1[0]}", f"w@{OWNER0[1]}"]

    async def main():
        store = FakeStore()
        router = Router(0, 2, store, run_dir)  # nothing listens on worker-1.sock
        with pytest.raises(OwnerUnavailable):
            await router.submit(txn("Q3", recipients))
        await router.close()  # waits for the background abort
        return store, router

    store, router = asyncio.run(main())
    assert store.ops("store") == ["Q3"]
    assert store.ops("abort") == ["Q3"]
    assert store.ops("decide") == [] and store.ops("release") == []
    assert store.parts == {} and store.held == set()
    assert router.in_flight == set()


def test_only_local_recipients_need_no_peer(run_dir):
    async def main():
        store = FakeStore()
        router = Router(0, 2, store, run_dir)
        await router.submit(txn("Q4", [f"u@{d}" for d in OWNER0]))
        await router.close()
        return store

    store = asyncio.run(main())
    assert store.parts["Q4"].coordinator is None
    assert [r.index for r in store.parts["Q4"].recipients] == [0, 1]


def test_only_remote_recipients_with_owner_down(run_dir):
    async def main():
        store = FakeStore()
        router = Router(0, 2, store, run_dir)
        with pytest.raises(OwnerUnavailable):
            await router.submit(txn("Q5", [f"u@{d}" for d in OWNER1]))
        await router.close()
        return store

    store = asyncio.run(main())
    assert store.calls == []


# -- two workers, a live peer in the same loop ----------------------------------------


async def _until(condition, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def _pair(run_dir, local: FakeStore, remote: FakeStore):
    peer = Router(1, 2, remote, run_dir)
    await peer.serve()
    assert os.path.exists(forward.socket_path(run_dir, 1))
    return Router(0, 2, local, run_dir), peer


def test_two_owners_two_phase_commit(run_dir):
    recipients = [f"u@{OWNER0[0]}", f"v@{OWNER1[0]}", f"w@{OWNER1[1]}", f"x@{OWNER0[1]}"]

    async def main():
        local, remote = FakeStore(), FakeStore()
        router, peer = await _pair(run_dir, local, remote)
        await router.submit(txn("Q6", recipients))
        # 250 may be sent now: the decision is durable before submit returns.
        assert "Q6" in local.decided
        await router.close()  # waits for the background releases (its own)
        await _until(lambda: "Q6" not in remote.held)  # the peer's asks no answer
        await peer.close()
        return local, remote

    local, remote = asyncio.run(main())
    assert [r.index for r in local.parts["Q6"].recipients] == [0, 3]
    assert [r.index for r in remote.parts["Q6"].recipients] == [1, 2]
    for store in (local, remote):
        part = store.parts["Q6"]
        assert part.coordinator == 0
        assert part.body == b"Subject: x\r\n\r\nhi\r\n"
        assert store.ops("release") == ["Q6"]
        assert store.held == set()
        assert store.ops("abort") == []
    assert local.calls.index(("decide", "Q6")) < local.calls.index(("release", "Q6"))
    assert remote.decided == set()  # only the coordinator records the decision


def test_only_remote_recipients_still_go_through_the_decision(run_dir):
    # A single remote part is stored held too: a store that completes after
    # the coordinator gave up (timeout, dropped connection) is never delivered.
    async def main():
        local, remote = FakeStore(), FakeStore()
        router, peer = await _pair(run_dir, local, remote)
        await router.submit(txn("Q10", [f"u@{d}" for d in OWNER1]))
        await router.close()
        await _until(lambda: "Q10" not in remote.held)  # the release asks no answer
        await peer.close()
        return local, remote

    local, remote = asyncio.run(main())
    assert local.decided == {"Q10"}
    assert remote.parts["Q10"].coordinator == 0
    assert remote.calls[0] == ("store", "Q10") and ("release", "Q10") in remote.calls


def test_peer_store_failure_aborts_the_local_part(run_dir):
    async def main():
        local, remote = FakeStore(), FakeStore(fail_store=True)
        router, peer = await _pair(run_dir, local, remote)
        with pytest.raises(SpoolError):
            await router.submit(txn("Q7", [f"u@{OWNER0[0]}", f"v@{OWNER1[0]}"]))
        await router.close()
        await peer.close()
        return local, remote

    local, remote = asyncio.run(main())
    assert local.ops("abort") == ["Q7"] and local.parts == {}
    assert local.decided == set()
    assert remote.parts == {}


def test_local_store_failure_aborts_the_peer_part(run_dir):
    async def main():
        local, remote = FakeStore(fail_store=True), FakeStore()
        router, peer = await _pair(run_dir, local, remote)
        with pytest.raises(SpoolError):
            await router.submit(txn("Q9", [f"u@{OWNER0[0]}", f"v@{OWNER1[0]}"]))
        await router.close()
        await peer.close()
        return local, remote

    local, remote = asyncio.run(main())
    assert remote.ops("store") == ["Q9"] and remote.ops("abort") == ["Q9"]
    assert remote.parts == {} and local.decided == set()


def test_decide_failure_aborts_every_part(run_dir):
    async def main():
        local, remote = FakeStore(fail_decide=True), FakeStore()
        router, peer = await _pair(run_dir, local, remote)
        with pytest.raises(SpoolError):
            await router.submit(txn("Q8", [f"u@{OWNER0[0]}", f"v@{OWNER1[0]}"]))
        await router.close()
        await asyncio.sleep(0.05)
        await peer.close()
        return local, remote

    local, remote = asyncio.run(main())
    assert local.parts == {} and remote.parts == {}
    assert local.ops("abort") == ["Q8"] and remote.ops("abort") == ["Q8"]
    assert local.ops("release") == [] and remote.ops("release") == []


def test_many_concurrent_transactions_over_one_connection(run_dir):
    async def main():
        local, remote = FakeStore(), FakeStore()
        router, peer = await _pair(run_dir, local, remote)
        await asyncio.gather(
            *(router.submit(txn(f"Q{i:03}", [f"u@{OWNER0[0]}", f"v@{OWNER1[0]}"])) for i in range(30))
        )
        await router.close()
        await asyncio.sleep(0.05)
        await peer.close()
        return local, remote

    local, remote = asyncio.run(main())
    ids = {f"Q{i:03}" for i in range(30)}
    assert set(local.parts) == ids == set(remote.parts)
    assert local.decided == ids
    assert local.held == set() and remote.held == set()


def test_status_answers(run_dir):
    async def main():
        local, remote = FakeStore(), FakeStore()
        router, peer = await _pair(run_dir, local, remote)
        remote.decided.add("D1")
        peer.in_flight.add("P1")
        answers = [await router._send(1, "status", q) for q in ("D1", "P1", "X1")]
        local.decided.add("D2")
        answers.append(await router._send(0, "status", "D2"))
        await router.close()
        await peer.close()
        return answers

    assert asyncio.run(main()) == ["decided", "pending", "aborted", "decided"]


def test_a_release_to_a_peer_is_one_frame_that_asks_no_answer(run_dir):
    answers = []

    async def main():
        local, remote = FakeStore(), FakeStore()
        router, peer = await _pair(run_dir, local, remote)
        await router.submit(txn("Q20", [f"u@{OWNER1[0]}"]))
        # No task, no pending request: the frame is queued for this turn's write.
        assert router._background == set() and router.peers[1]._pending == {}

        class Counting(dict):  # _read_replies looks each answer up here
            def get(self, rid, default=None):
                answers.append(rid)
                return super().get(rid, default)

        router.peers[1]._pending = Counting()
        await _until(lambda: "Q20" not in remote.held)
        await asyncio.sleep(0.05)  # an answer, were one sent, would have arrived
        await router.close()
        await peer.close()
        return remote

    remote = asyncio.run(main())
    assert remote.ops("release") == ["Q20"]
    assert answers == []


def test_a_release_without_a_connection_becomes_a_request(run_dir):
    async def main():
        local, remote = FakeStore(), FakeStore()
        router, peer = await _pair(run_dir, local, remote)
        client = router.peers[1]
        assert client.notify({"op": "release", "id": "Q21"}) is False  # never connected
        remote.parts["Q21"] = make_part(coordinator=0)
        remote.held.add("Q21")
        router._release(1, "Q21")
        assert len(router._background) == 1  # the request's task
        await router.close()  # waits for it: answered, so the release was done
        released = "Q21" not in remote.held
        await peer.close()
        return released

    assert asyncio.run(main()) is True


def test_a_frame_without_a_request_id_that_is_not_a_release_is_ignored(run_dir):
    async def main():
        local, remote = FakeStore(), FakeStore()
        router, peer = await _pair(run_dir, local, remote)
        await router.peers[1].connected()
        remote.parts["Q22"] = make_part(coordinator=0)
        remote.held.add("Q22")
        assert router.peers[1].notify({"op": "abort", "id": "Q22"}) is True
        status = await router._send(1, "status", "Q22")  # the connection still serves
        await router.close()
        await peer.close()
        return status, remote

    status, remote = asyncio.run(main())
    assert status == "aborted" and remote.ops("abort") == [] and "Q22" in remote.held


def test_closing_a_frame_writer_writes_the_frames_of_this_turn_first():
    class Recording:
        def __init__(self) -> None:
            self.log: list = []

        def writelines(self, chunks) -> None:
            self.log.append(("write", b"".join(chunks)))

        def is_closing(self) -> bool:
            return False

        def close(self) -> None:
            self.log.append(("close",))

    async def run():
        stream = Recording()
        writer = forward.FrameWriter(stream)
        writer.send({"op": "release", "id": "Q"})
        writer.close()
        await asyncio.sleep(0)  # the turn's scheduled flush finds nothing left
        return stream.log

    log = asyncio.run(run())
    assert [entry[0] for entry in log] == ["write", "close"]
    assert b'"release"' in log[0][1]


def test_routed_recipient_matches_shard():
    rcpt = recipient(f"u@{OWNER1[0]}", 5)
    assert rcpt.slot == slot_of(OWNER1[0]) and rcpt.index == 5


def test_the_frames_of_one_loop_turn_go_out_in_one_write_in_order():
    class Recording:
        def __init__(self) -> None:
            self.writes: list[bytes] = []

        def writelines(self, chunks) -> None:
            self.writes.append(b"".join(chunks))

        def is_closing(self) -> bool:
            return False

    async def run():
        stream = Recording()
        writer = forward.FrameWriter(stream)
        writer.send({"rid": 1, "op": "store"}, b"a body")
        writer.send({"rid": 2, "op": "release"})
        before = list(stream.writes)
        await asyncio.sleep(0)
        writer.send({"rid": 3, "op": "status"})
        await asyncio.sleep(0)
        return before, stream.writes

    before, writes = asyncio.run(run())
    assert before == []  # nothing is written until the turn ends
    assert len(writes) == 2

    def frames(data: bytes):
        while data:
            header_len, body_len = forward.FRAME.unpack(data[:forward.FRAME.size])
            start = forward.FRAME.size
            yield orjson.loads(data[start:start + header_len])["rid"], data[start + header_len:start + header_len + body_len]
            data = data[start + header_len + body_len:]

    assert list(frames(writes[0])) == [(1, b"a body"), (2, b"")]
    assert list(frames(writes[1])) == [(3, b"")]
