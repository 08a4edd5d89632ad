"""The operator console at ``/ui``: server-rendered pages (``templates/``) and a small script and style
sheet (``static/``), shipped in the package; nothing is fetched from elsewhere. See ``pages.py``.
An entry point beside api/: may import api/ (its dependencies and views), serving/, store/, db/ and the plumbing."""
