"""The write path, in the order a record takes it: intake (``intake.py`` core NATS,
``jetstream.py`` a durable pull consumer, set up by ``jetstream_setup.py``; both
through ``edge.py``) -> ``decode.py``
(payload -> rows + rejects, with the mirrors and checks of ``records.py``) ->
``queue.py`` (bounded, counted in records) -> ``batcher.py`` (size or linger, retry,
ack or reply after commit). ``backpressure.py`` holds the watermark state machine.

Uses ``bus/`` and ``store/``; never ``control/``, ``read/`` or ``runtime/``.
"""
