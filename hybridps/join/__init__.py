"""``hybridps join``: impressions and delayed actions joined into labeled rows, exactly once.

A process of its own in front of the trainer: it reads impression events and action events
(a stream directory or a Redis stream each), joins them by request id within a window of event
time, and writes one row per impression with its labels to the trainer's stream. Modules:
``events`` (what an event is, checked), ``sources`` (reading, with positions), ``window`` (the
window state and the watermark), ``outputs`` (batches written idempotently), ``state`` (the
atomic checkpoint), ``config`` (settings and flags), ``process`` (the loop). docs/join.md
gives the semantics.
"""
