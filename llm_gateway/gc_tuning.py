"""A serving process's garbage-collector settings, applied once at start.

Everything loaded at start (modules, classes, the app, the framework's tables) lives
as long as the process. Left to the cyclic collector, it is walked again by every
older-generation collection, and an edge relaying many streams allocates fast
enough to run those often: `perf record` of the edge at 50 concurrent 32-token
streams with 20 ms between tokens put 7 to 8% of its CPU in the collector
(`gc_collect_main`, `visit_decref`, `visit_reachable`, the `*_traverse` functions).
The control plane's start-up heap (SQLAlchemy's mappers and compiled statements, the
catalog) is larger still, and each request allocates rows, dicts and futures.
`gc.freeze()` moves that start-up heap into the permanent generation, which no
collection walks; objects made later (streams, requests, connections) are collected as
before. Not done per app (tests build many apps in one process, and a frozen
object is never freed): once, by whatever starts the serving process.
"""

from __future__ import annotations

import gc

# Allocations (net of frees) between two youngest-generation collections; Python's
# default is 700. A stream's objects live for its whole length, so at the default
# nearly all of them are walked by a collection, promoted, and walked again by the
# older ones. At 20,000 a 600-stream run at c=50 saw one young collection instead of
# about a hundred (and their promotions); one collection then walks a few ms of
# objects, an event-loop pause well inside the first-token budget. Only objects in
# reference cycles wait longer to be freed; everything else goes at once, as before.
YOUNG_THRESHOLD = 20_000


def freeze_startup_heap() -> None:
    gc.collect()  # what is already garbage is freed, not frozen
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD)
