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
notes it in the site's ``SiteStatus.sequence_backwards`` (``status.json``), so ``fedmq status``
shows it; the alarm clears when the site continues past the last accepted seq.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack

from fedmq.shared.errors import ReplayedUpdate

REASON = "sequence-backwards"


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
