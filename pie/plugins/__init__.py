"""Plugin package for pie's extension points (remote service types, model loaders).

Third-party distributions add modules to `pie/plugins/` (without an __init__.py
of their own); twisted.plugin.getPlugins(interface, pie.plugins) finds them.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))  # noqa: F821 - set by the import system
__all__: list[str] = []
