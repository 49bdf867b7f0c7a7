"""API surfaces beyond chat and text completions, one module each; each registers its routes on the app."""
