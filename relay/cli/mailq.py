"""mailq / sendmail -bp: the messages in the queue, like ``postqueue -p``.

Input: every worker's spool, read-only (``relay.cli.spoolread``; the relay
may run or not).  Output: one entry per message with recipients still to
deliver: queue id (``*`` while being sent, ``!`` while held for its
transaction's decision), size, arrival time and sender, then the last
reply of the recipients that were deferred, in parentheses, above them,
and each recipient; then ``-- N Kbytes in M Requests.``, or ``Mail queue
is empty``.  A message split across owner workers is one entry.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Iterable

from relay.cli import spoolread
from relay.cli.spoolread import ReadError, WaitingRecipient
from relay.spool.format import MessageState, RecipientState


@dataclass
class Entry:
    queue_id: str
    sender: str
    received: float
    size: int
    flag: str = " "
    # last reply (None: not tried yet) -> recipients, in order of first sight
    recipients: dict[str | None, list[str]] = field(default_factory=dict)


def entries(rows: Iterable[WaitingRecipient]) -> list[Entry]:
    """Rows of any spools -> one entry per message, oldest first."""
    found: dict[str, Entry] = {}
    for row in rows:
        entry = found.get(row.queue_id)
        if entry is None:
            entry = found[row.queue_id] = Entry(row.queue_id, row.sender, row.received, row.size)
        if row.message_state == MessageState.HELD:
            entry.flag = "!"
        elif row.state == RecipientState.SENDING and entry.flag == " ":
            entry.flag = "*"
        reason = row.last_reply if row.state == RecipientState.DEFERRED else None
        entry.recipients.setdefault(reason, []).append(row.address)
    return sorted(found.values(), key=lambda e: (e.received, e.queue_id))


def render(queue: list[Entry], localtime=time.localtime) -> str:
    if not queue:
        return "Mail queue is empty\n"
    width = max(10, max(len(e.queue_id) for e in queue))
    lines = [f"{'-Queue ID-':<{width + 1}} --Size-- ----Arrival Time---- -Sender/Recipient-------"]
    indent = " " * (width + 1 + 1 + 8 + 1 + 19 + 2)  # under the sender
    kbytes = 0
    for entry in queue:
        when = time.strftime("%a %b %e %H:%M:%S", localtime(entry.received))
        lines.append(f"{entry.queue_id + entry.flag:<{width + 1}} {entry.size:>8} {when:<19.19}  "
                     f"{entry.sender or 'MAILER-DAEMON'}")
        for reason, addresses in entry.recipients.items():
            if reason:
                lines.append(f"({spoolread.printable(reason)})")
            lines.extend(indent + address for address in addresses)
        lines.append("")
        kbytes += (entry.size + 1023) // 1024
    plural = "Request" if len(queue) == 1 else "Requests"
    lines.append(f"-- {kbytes} Kbytes in {len(queue)} {plural}.")
    return "\n".join(lines) + "\n"


class _Args:
    def __init__(self, config: str) -> None:
        self.config = config
        self.offline = True  # the spool is read either way


def run(config_path: str) -> int:
    """Print the queue; 0, or 75 when the spool cannot be read (78: config)."""
    try:
        with spoolread.open_spools(_Args(config_path)) as spools:
            rows = [row for reader in spools.readers for row in reader.waiting_recipients()]
    except ReadError as exc:
        print(f"mailq: {exc}", file=sys.stderr)
        return 78 if exc.status == 2 else 75
    sys.stdout.write(render(entries(rows)))
    return 0
