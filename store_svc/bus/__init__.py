"""The NATS side shared by every edge: the client (``client.py``: nats-py with the
fixes the service depends on), one watched connection per role (``connection.py``:
faults, disconnects, RTT) and the header helpers (``headers.py``).

Imports only the base modules; every other folder may use it.
"""
