"""The registry of remote service types and model loaders: plugins found with getPlugins.

`attach_remote_service {endpoint, service_type, service_name}` names a service
type; each type is an IRemoteServiceType plugin module under `pie/plugins/`
(pie ships `l4m`; a third-party distribution adds its own module to that
package, see docs/plugins.md). Looking them up at call time, not import time,
means a package installed while the daemon runs is seen on the next attach.

A plugin that does not satisfy its interface is left out and logged with its
name, so one broken third-party package cannot take the built-in types down.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.logger import Logger
from twisted.plugin import getPlugins
from zope.interface import Interface
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

import pie.plugins
from pie.interfaces import IModelLoader, IRemoteServiceType, PieError

log = Logger()


def _verified(interface: type[Interface]) -> list:
    """Every plugin of `interface` in pie.plugins that really provides it."""
    found = []
    for plugin in getPlugins(interface, pie.plugins):
        try:
            verifyObject(interface, plugin)
        except Invalid as error:
            log.error(
                "ignoring plugin {plugin!r} from {module}: it does not provide {iface}: {error}",
                plugin=plugin,
                module=type(plugin).__module__,
                iface=interface.__name__,
                error=error,
            )
            continue
        found.append(plugin)
    return found


def service_types() -> dict[str, object]:
    """typeName -> IRemoteServiceType plugin, for every installed service type."""
    return {plugin.typeName: plugin for plugin in _verified(IRemoteServiceType)}


def model_loaders() -> dict[str, object]:
    """formatName -> IModelLoader plugin, for every installed model loader."""
    return {plugin.formatName: plugin for plugin in _verified(IModelLoader)}


def attach_remote_service(
    runtime: object, endpoint: str, service_type: str, service_name: str
) -> Deferred:
    """Attach `endpoint` with the plugin for `service_type`; Deferred with its success text.

    Errbacks with PieError naming the known types when the type is unknown.
    """
    types = service_types()
    plugin = types.get(service_type)
    if plugin is None:
        known = ", ".join(sorted(types)) or "none"
        return fail(PieError(f"Unknown service type: {service_type!r} (installed: {known})"))
    return maybeDeferred(plugin.attach, runtime, endpoint, service_name)
