"""Hospital-side agent: loads local images, trains a model for one round, keeps the privacy ledger.

Nothing here touches the network or the disk at import time; the broker-facing parts live
in sibling modules owned by other components.
"""
