"""Makes `twistd pie` exist. ServiceMaker names pie.tap by its dotted name and imports it only
when the `pie` tap runs, so a plugin scan imports neither pie.tap nor torch."""

from twisted.application.service import ServiceMaker

pie = ServiceMaker(
    "pie",
    "pie.tap",
    "Programmable LLM inference engine: inferlets over a WebSocket/msgpack protocol.",
    "pie",
)

worker = ServiceMaker(
    "pie-worker",
    "pie.remote.worker",
    "A pie model worker: loads a model and serves it to one daemon (attach type l4m).",
    "pie-worker",
)
