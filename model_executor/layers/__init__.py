"""Building blocks shared by the LLaDA and Dream models."""
