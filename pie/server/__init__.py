"""The client-facing side of the daemon: Pie 0.1.1's WebSocket/msgpack protocol.

messages: the wire schema; auth: JWT tokens; uploads: chunk assembly and
checks; protocol: one autobahn session per client (IInstanceOwner of what it
launches) and the factory holding the runtime and limits; service: the
listener as a Twisted service. docs/protocol.md describes the protocol.
"""
