"""A client that keeps reading the database while something happens to it.

``Probe`` opens a new connection and runs one query every 20 ms in a thread, and remembers
when each attempt succeeded (wall clock, to compare with log timestamps): the longest gap
between two successes is what an application would see as unavailability (or, on a
saturated machine, as latency). Used by the benchmarks.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field

import psycopg2

PROBE_INTERVAL = 0.02


@dataclass
class Probe:
    """Connect and run ``query`` in a loop; remember when each attempt succeeded."""

    dsn: str
    query: str = "SELECT 1"
    successes: list[float] = field(default_factory=list)
    failures: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Probe:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn = psycopg2.connect(self.dsn, connect_timeout=5)
                try:
                    with conn.cursor() as cur:
                        cur.execute(self.query)
                        cur.fetchall()
                finally:
                    conn.close()
                self.successes.append(time.time())
            except psycopg2.Error:
                self.failures += 1
            time.sleep(PROBE_INTERVAL)

    def longest_gap_ms(self) -> float:
        gaps = [b - a for a, b in itertools.pairwise(self.successes)]
        return max(gaps, default=0.0) * 1000

    def gap_spanning_ms(self, moment: float) -> float:
        """The gap between the successes around ``moment`` (a ``time.time()``): what a
        client saw of the event logged then."""
        for before, after in itertools.pairwise(self.successes):
            if before <= moment <= after:
                return (after - before) * 1000
        return 0.0
