"""The web dashboard's assets (index.html, ES modules, one stylesheet), shipped as package data and served by
api/ui.py at /ui. Plain ES modules the browser loads as they are: no bundler, no npm, no build step, so
`pip install` alone ships the dashboard and it works offline."""
