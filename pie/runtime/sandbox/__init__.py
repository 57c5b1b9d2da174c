"""The guest side of the sandbox: the Python app inside the runtime component.

componentize-py builds `app` (with `loader`, the bundled `pie.inferlet` SDK
and the stdlib allow-list) into one WebAssembly component; see
pie/runtime/executors/build.py and docs/sandbox.md. Everything here must stay
pure Python with no host-only imports.
"""
