"""ropelab.patches: applying position methods to HuggingFace models (issue 3)."""
