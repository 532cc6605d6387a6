"""The read API: query and latest requests over NATS request-reply (``api.py``),
their cursors (``cursor.py``) and the ``store-svc query`` command (``cli.py``).

Uses ``bus/``, ``ingest/`` (the same symbol and time checks as writes) and
``store/`` (the read contract).
"""
