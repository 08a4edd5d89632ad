"""What a job is: the lease and its states (lease), one module per job kind (ingest, train, forget, bootstrap),
job options and their validation, progress, publication and the gates, the sharded stage, accepting uploads.
Imports store/, db/, the plumbing and peer_model; never serving/, api/, ui/ or worker/."""
