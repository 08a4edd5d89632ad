"""What an API process serves with: the model host (engine: the active version, batched decoding, hot swap,
usage counters), expert usage roll-ups (usage) and what the served model's state means for a caller (status).
Imports store/, db/ and the plumbing; never jobs/ or api/."""
