"""The command-line console for a running modelyard: `ps`, `ls`, `load`, `unload`, `logs`, `chat` and `top`.
It talks to the server only over HTTP (client.py), never to the manager, so it works against any modelyard
it can reach; render.py turns the server's JSON into tables and lines (pure), commands.py is the shell."""
