"""Evals: OpenAI-style graders over an item and a sample, the classification report, and the
executor that runs an eval run on a worker (sampling through the serving engine)."""
