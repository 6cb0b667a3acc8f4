"""A site whose sequence went backwards: its state directory (and privacy ledger) was lost.

Each site numbers its updates 1, 2, 3, ... and persists the counter beside its privacy ledger.
A site that lost that directory starts again at 1. Without this rule the aggregator refused its
updates as duplicates while the site, never told, kept charging a budget it believed fresh.

Kept apart from the engine's de-duplication (which is per update id) so both rules stay small:
- a first chunk whose ``seq`` is below the last accepted one, or equal to it with a different
  header (another update under a reused number), is a sequence that went backwards;
- the very same update re-sent (same seq, same header: a site re-publishing its pending update
  after a crash) is only a duplicate, never an alarm;
- a fresh site (snapshot request with ``have_version == -1``) whose id already has accepted
  updates has a known identity without its ledger.
The aggregator answers each on the site's own queue (a ``Rejection`` with ``last_seq``) and
lists it in ``status.json`` so ``fedmq status`` shows it.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import msgpack

from shared.errors import ReplayedUpdate

REASON = "sequence-backwards"
STATUS_KEY = "sequence_backwards"


class SequenceBackwards(ReplayedUpdate):
    reason = REASON


def header_digest(header: dict[str, Any]) -> str:
    """A stable digest of an update's header (every field but the per-chunk ones)."""
    return hashlib.sha256(msgpack.packb(header, use_bin_type=True, default=str)).hexdigest()[:32]


def check_sequence(site_id: str, seq: int, last_seq: int, digest: str, last_digest: str | None) -> None:
    """Raise ``SequenceBackwards`` when ``seq`` cannot be the site's next update.

    Call for a first chunk that is not a broker redelivery and not already pending; an exact
    re-send of the last accepted update (same seq and header) passes and is left to de-duplication."""
    if seq < last_seq or (seq == last_seq and last_digest is not None and digest != last_digest):
        raise SequenceBackwards(
            f"{site_id} sent seq {seq} but the aggregator already accepted seq {last_seq} from it: the site's "
            f"state directory (sequence counter and privacy ledger) was lost or restored from an old copy"
        )


def known_identity_detail(site_id: str, last_seq: int) -> str:
    return (f"{site_id} starts with no state, but the aggregator already accepted {last_seq} update(s) from it: "
            f"restore the site's state directory (its privacy ledger) instead of starting afresh")


def record(sites: dict[str, dict[str, Any]], site_id: str, seq: int, last_seq: int) -> None:
    """Note the event in the site's status entry (persisted with the checkpoint's ``sites``)."""
    info = sites.setdefault(site_id, {})
    prev = info.get(STATUS_KEY) or {}
    info[STATUS_KEY] = {"seq": int(seq), "last_seq": int(last_seq), "at": time.time(),
                        "count": int(prev.get("count", 0)) + 1}


def clear_if_resumed(info: dict[str, Any], seq: int) -> None:
    """A site restored from backup continues past the last accepted seq: the alert is over."""
    back = info.get(STATUS_KEY)
    if back and seq > int(back.get("last_seq", 0)):
        info.pop(STATUS_KEY, None)
