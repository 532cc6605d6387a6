"""Tools for trying the service out and for its tests and benchmarks: private
``nats-server`` and PostgreSQL runners and the ``store-svc demo`` feed. The service
itself never imports them.
"""
