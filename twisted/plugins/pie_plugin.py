"""Makes `twistd pie` exist. ServiceMaker names pie.tap by its dotted name and imports it only
when the `pie` tap runs, so a plugin scan imports neither pie.tap nor torch."""

from twisted.application.service import ServiceMaker

pie = ServiceMaker(
    "pie",
    "pie.tap",
    "Programmable LLM inference engine: inferlets over a WebSocket/msgpack protocol.",
    "pie",
)
