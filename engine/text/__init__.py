"""Layer 1, text: the tokenizer (SentencePiece, HF tokenizers, byte-level; chat templates in a sandbox) and
structured outputs (llguidance grammars for JSON schemas, regexes, choices)."""
