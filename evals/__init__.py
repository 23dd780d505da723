"""ropelab.evals: perplexity-versus-length, passkey, lm-eval bridge, plots, CLI (issue 4)."""
