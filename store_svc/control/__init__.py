"""What answers operators and upstream pipelines: health and readiness
(``health.py``), the NATS micro service (``micro.py``), admin control and audit
(``admin.py``), feedback events (``feedback.py``), Prometheus metrics and the HTTP
probes (``metrics.py``, ``probes.py``).

Each part takes only what it reads (``state.ServiceView``, settings, callables),
never the service; uses ``bus/`` and ``ingest/backpressure.py``.
"""
