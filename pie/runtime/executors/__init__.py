"""Inferlet executors: the wasm sandbox and in-process dev mode."""
