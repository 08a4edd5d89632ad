"""The HTTP API: the FastAPI app (app), its routes (routes/), who may call what (security: keys and scopes, body
limits, cross-site refusal, rate limits) and streaming. An entry point: may import jobs/, serving/, store/, db/,
the plumbing and ui/ (the console it mounts)."""
