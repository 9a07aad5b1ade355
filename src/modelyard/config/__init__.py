"""Where models come from: INI presets, a models directory, and the engine's option table."""
