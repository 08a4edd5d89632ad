"""Where bytes live: files on a local disk or an object store (files), content-addressed checkpoint chunks
(chunks), the Store over both (store), the store lock, retention and garbage collection, versions and activation.
Imports db/, the plumbing (settings, errors) and peer_model; ServiceContext only in annotations (it holds a Store)."""
