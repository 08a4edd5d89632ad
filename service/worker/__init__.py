"""The Celery app (app: the ingest and train queues, tasks that only call jobs/, the watchdog), the watchdog's
housekeeping (usage roll-ups, retention, garbage collection) and a worker in a thread for tests and demos (inline).
An entry point: may import jobs/, serving/, store/, db/ and the plumbing."""
