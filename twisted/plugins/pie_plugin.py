"""Makes `twistd pie` exist; pie.tap builds the daemon (its heavy imports wait until it runs)."""

from pie.tap import serviceMaker

pie = serviceMaker()
