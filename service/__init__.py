"""peer-service: the FastAPI server, Celery workers and database around :mod:`peer_model` (docs/architecture.md).
Layers: api/ ui/ worker/ cli client → jobs/ and serving/ → store/ → db/ → the plumbing (settings, errors, logs, keys,
metrics, context); imports run only downward (tests/test_layout.py) and peer_model never imports the service."""
