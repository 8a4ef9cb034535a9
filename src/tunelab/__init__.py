"""tunelab: fine-tune and serve open-weight language models behind an OpenAI-compatible API."""

__version__ = "0.1.0"
