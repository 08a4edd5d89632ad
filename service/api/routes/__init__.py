"""The routes, one module per resource (corpora, streams, probes, jobs, versions, experts, generate, openai, status;
health: liveness and readiness); thin: they check the request, call jobs/, serving/ or store/, and shape the answer.
May import what api/ may."""
