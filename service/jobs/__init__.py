"""What a job is: the lease and its states (lease), one module per job kind (ingest, train, forget, bootstrap), job
options (options), progress, publication and the gates (publish), the shared run (runner), the sharded stage, uploads.
Imports store/, db/, the plumbing and peer_model; never serving/, api/, ui/ or worker/."""
