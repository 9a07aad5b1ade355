"""How a model process is started: locating or building llama-server and building its command line."""
