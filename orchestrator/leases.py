"""Keeping this replica's session leases alive while their generations run."""

import logging
import threading

from .store import Lease, SessionStore, StoreUnavailable

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Renews every held lease three times per lease period, so a long span does not let it lapse.

    A replica that stops (killed, paused, cut off) stops renewing: its leases lapse and another
    replica may take its sessions over; its own later writes are then fenced by the store.
    """

    def __init__(self, store: SessionStore):
        self.store = store
        self._held: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        self._thread = None

    def hold(self, lease: Lease) -> None:
        with self._lock:
            self._held.add((lease.session_id, lease.epoch))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
                self._thread.start()

    def drop(self, lease: Lease) -> None:
        with self._lock:
            self._held.discard((lease.session_id, lease.epoch))

    def _run(self) -> None:
        while True:
            threading.Event().wait(self.store.lease_s / 3)
            with self._lock:
                held = list(self._held)
            for session_id, epoch in held:
                try:
                    if not self.store.renew(Lease(session_id, epoch)):
                        log.warning("session %s: lease epoch %d was taken over", session_id, epoch)
                        self.drop(Lease(session_id, epoch))
                except StoreUnavailable as e:
                    log.warning("could not renew the lease of session %s: %s", session_id, e)
