"""helloworld: says who it is; no model needed."""

from pie.inferlet import get_instance_id, get_version, send


async def main(args):
    text = f"Hello World!! I am instance {get_instance_id()}, running on pie {get_version()}"
    send(text)
