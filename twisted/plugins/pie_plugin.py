"""Makes `twistd pie` exist; the daemon itself lives in pie.tap (imported only when used)."""

from twisted.application.service import ServiceMaker

pie = ServiceMaker(
    "pie",
    "pie.tap",
    "Programmable LLM inference engine: inferlets over a WebSocket/msgpack protocol.",
    "pie",
)
