"""`modelyard bench`: modelyard and llama-server router mode side by side, on the same binary and models."""
