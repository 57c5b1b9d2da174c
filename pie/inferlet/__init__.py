"""pie.inferlet: the SDK for programs that run inside pie next to the model.

An inferlet is a module with `async def main(args)`; `args` are the launch
arguments (argv style). It drives generation token by token:

    from pie.inferlet import get_auto_model, send

    async def main(args):
        model = get_auto_model()
        ctx = model.create_context()
        ctx.system("You are terse.")
        ctx.user("Name a colour.")
        ctx.cue()
        send(await ctx.generate_until(max_tokens=16))

Everything here is pure Python over the host ABI (pie.inferlet._abi), so it
runs the same inside the WebAssembly sandbox and in dev mode. See
docs/inferlet-api.md.
"""

from pie.inferlet.brle import Brle
from pie.inferlet.context import Context
from pie.inferlet.drafter import Drafter, EmptyDrafter
from pie.inferlet.grammar import Grammar, GrammarError, Matcher
from pie.inferlet.instance import (
    debug_query,
    gather,
    get_arguments,
    get_instance_id,
    get_version,
    set_return,
    sleep,
    spawn,
    time_ms,
)
from pie.inferlet.messaging import (
    Subscription,
    broadcast,
    receive,
    send,
    store_delete,
    store_exists,
    store_get,
    store_list_keys,
    store_set,
    subscribe,
)
from pie.inferlet.model import (
    Distribution,
    Model,
    NoChatTemplate,
    Queue,
    TemplateError,
    Tokenizer,
    get_all_models,
    get_auto_model,
    get_model,
)
from pie.inferlet.pool import IdPool
from pie.inferlet.sampling import (
    AnyOf,
    Greedy,
    Length,
    Sampler,
    StopCondition,
    Temperature,
    TopK,
    TopP,
    Typical,
    Until,
    UntilAny,
    any_of,
)

__all__ = [
    "AnyOf",
    "Brle",
    "Context",
    "Distribution",
    "Drafter",
    "EmptyDrafter",
    "Grammar",
    "GrammarError",
    "Greedy",
    "IdPool",
    "Length",
    "Matcher",
    "Model",
    "NoChatTemplate",
    "Queue",
    "Sampler",
    "StopCondition",
    "Subscription",
    "Temperature",
    "TemplateError",
    "Tokenizer",
    "TopK",
    "TopP",
    "Typical",
    "Until",
    "UntilAny",
    "any_of",
    "broadcast",
    "debug_query",
    "gather",
    "get_all_models",
    "get_arguments",
    "get_auto_model",
    "get_instance_id",
    "get_model",
    "get_version",
    "receive",
    "send",
    "set_return",
    "sleep",
    "spawn",
    "store_delete",
    "store_exists",
    "store_get",
    "store_list_keys",
    "store_set",
    "subscribe",
    "time_ms",
]
