"""The torch side: models, attention, KV cache, quantized linears, sampling, loaders, tokenizer, TP, the worker thread.

Nothing here imports Twisted; the service meets it only at the plain-data jobs of batch.py.
"""
