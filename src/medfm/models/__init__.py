"""medfm's model families."""
