"""The built-in `l4m` remote service type: a `pie worker` process reached over WebSocket.

Kept import-cheap (getPlugins imports every module in pie.plugins): the
network code is imported only when an attach happens.
"""

from __future__ import annotations

from twisted.plugin import IPlugin
from zope.interface import implementer

from pie.interfaces import IRemoteServiceType


@implementer(IPlugin, IRemoteServiceType)
class L4MServiceType:
    typeName = "l4m"
    description = "a pie model worker (`pie worker`), msgpack frames over WebSocket"

    def attach(self, runtime: object, endpoint: str, service_name: str) -> object:
        from pie.service.placement import attach_worker

        return attach_worker(runtime, endpoint, service_name)


l4m = L4MServiceType()
