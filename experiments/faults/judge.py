"""Whether a fault run kept fedmq's guarantees: the rules, in one place.

A live run passes when every confirmed update was counted exactly once and nothing else was
(no loss, no duplicate, nothing partial or unconfirmed counted), the decrypted model equals the
plaintext replay of the counted updates, every site that holds the final version decrypted the
aggregator's state, no site spent more than its epsilon target, every recovery stayed within the
plan's ``max_recovery_s``, the weights announced in each version equal the replay's, and no
process died that the plan did not kill. The fuzzers check their own properties as they run
(``experiments.faults.fuzz``) and stop with :class:`FaultCheckFailed` on a violation.
"""

from __future__ import annotations

from typing import Any

from fedmq.experiments.faults.plan import LiveResult

#: the decrypted model may differ from the plaintext replay by this share of the smallest single
#: update's contribution: one update more or less moves it by at least that contribution, while
#: the CKKS error is orders of magnitude smaller
MODEL_ERROR_SHARE = 0.01
#: float tolerance on epsilon (the ledger's sum of RDP terms, converted)
EPSILON_TOLERANCE = 1e-9


def live_problems(r: LiveResult) -> list[str]:
    """Every way ``r`` failed, as one line each (empty: the run passed)."""
    out = []
    if r.lost:
        out.append(f"lost updates: {r.lost}")
    if r.duplicates:
        out.append(f"duplicated updates: {r.duplicates}")
    if r.counted_unconfirmed:
        out.append(f"counted but never confirmed: {r.counted_unconfirmed}")
    if r.model_max_abs_error > MODEL_ERROR_SHARE * r.min_update_contribution:
        out.append(f"decrypted model differs from the plaintext replay by {r.model_max_abs_error:.3g} "
                   f"(one update moves it by >= {r.min_update_contribution:.3g})")
    if not r.sites_agree_with_aggregator:
        out.append("a site's decrypted global model differs from the aggregator's state")
    over = {s: e for s, e in r.epsilon_by_site.items() if e > r.epsilon_target + EPSILON_TOLERANCE}
    if over:
        out.append(f"epsilon above target {r.epsilon_target}: {over}")
    if r.max_recovery_seconds > r.max_recovery_bound_s:
        out.append(f"recovery took {r.max_recovery_seconds:.1f}s (plan's bound {r.max_recovery_bound_s:.1f}s)")
    if r.contributor_weight_mismatches:
        out.append(f"{r.contributor_weight_mismatches} contributor weight(s) differ from the replay's")
    if r.unexpected_exits:
        out.append(f"processes exited unexpectedly: {r.unexpected_exits}")
    return out


def verdict(results: list[LiveResult]) -> dict[str, Any]:
    """The summary's verdict over every live run (the fuzzers passed if they returned)."""
    problems = [p for r in results for p in live_problems(r)]
    return {"problems": problems, "ok": problems == []}
