"""Hugging Face as a model source, as llama-server router mode uses it: `org/repo[:quant]` references and the
file a quant picks (refs.py, pure), the Hugging Face cache and what it lists (cache.py), where the hub is and
which token is used (access.py), one file's download with resume and sha256 check (fetch.py, blocking: it runs
in a worker thread), the downloads in flight, joined and cancelled (downloads.py), what their progress looks
like to router mode's and Ollama's clients (events.py, pure), and a repository's own preset.ini served with
`-hf org/repo` on the command line (presets.py)."""
