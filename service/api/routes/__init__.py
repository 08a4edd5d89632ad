"""The routes, one module per resource (corpora, streams, jobs, versions, experts, generate, openai, status; health:
the probes); thin: they check the request, call jobs/, serving/ or store/, and shape the answer.
May import what api/ may."""
