"""Fine-tuning data: format checks and token statistics, one implementation for CLI and server.

Pure: no database, no server, no model weights (a Hugging Face tokenizer may be passed in).

- ``validate.validate_file(path, ...) -> FileReport``: check a JSONL file and count its tokens.
- ``formats.iter_chat_examples(path)``: read a checked file as chat examples, for training.
- ``stats.auto_n_epochs(n_examples)``: the default-epochs rule.
- ``encodings.get_encoding(name)``: offline tiktoken encodings.
"""
