"""The embedded demo: a synthetic verifiable arithmetic task and a tiny Qwen2-style model."""
