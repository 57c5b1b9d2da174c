"""pie: a programmable LLM inference engine on Twisted.

Users upload inferlets (Python programs) that run next to the model and steer
generation token by token; the engine batches every inferlet's forward passes.
See docs/architecture.md for how data flows and which thread owns what.
"""

__version__ = "0.2.0"
