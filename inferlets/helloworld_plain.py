"""helloworld-plain: helloworld on the bare ABI, without the SDK.

The same greeting as helloworld, but every host call is made by its name in
the host-call table (pie/runtime/hostcalls.py) through pie.inferlet._abi,
the one module the SDK itself is built on: `_abi.call(name, *args)` for sync
calls, `await _abi.call_async(name, *args)` for async ones. In the sandbox
these are the WIT imports of pie/runtime/inferlet.wit; in dev mode, the host
binding. Nothing else of pie.inferlet is imported.
"""

from pie.inferlet import _abi


async def main(args):
    instance = _abi.call("get_instance_id")
    version = _abi.call("get_version")
    _abi.call("send", f"Hello World!! I am instance {instance}, running on pie {version}")
