"""Where rows live: the write interface (``base.py``), the read contract
(``reads.py``), the value codecs (``codec.py``, standard library and msgspec only),
SQLite (``sqlite.py`` the writer, ``sqlite_read.py`` the queries, both through
worker processes: ``sqlite_process.py`` the parent side, ``sqlite_worker.py`` the
child), PostgreSQL (``postgres.py``, ``postgres_read.py``), an in-memory sink for
logic tests (``memory.py``) and the factory that picks one (``factory.py``).

The folder imports only the base modules; this file itself imports nothing, so a
worker process started with ``python -m store_svc.store.sqlite_worker`` loads just
what it needs.
"""
