"""peer-service: the FastAPI server, Celery workers and database around :mod:`peer_model`."""
