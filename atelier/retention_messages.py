"""What one retention clean-up call reports (a RetentionResult, plus the sweep's counts)."""

from __future__ import annotations

from dataclasses import dataclass

from atelier.messages import RetentionResult


@dataclass
class CleanResult(RetentionResult):
    # The sweep of blobs nobody holds (atelier/deletion.py, sweep_unheld): files of the store looked
    # at by this call, blobs deleted (also counted in blobs_deleted), leftovers (thumbnails of
    # deleted blobs, temporary files of crashed writes) removed.
    blobs_examined: int = 0
    unheld_blobs_deleted: int = 0
    leftovers_deleted: int = 0
