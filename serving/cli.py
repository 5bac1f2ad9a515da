"""The ``prefixserve`` command line: demo, serve, generate, adapters."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .config import env_server
from .extras import MissingExtraError, require

if TYPE_CHECKING:
    from .client import Client, Prompt
    from .server import PrefixServer, ServerConfig

GUIDE = """\
Start here:
  prefixserve demo                          serve the default model with the example adapters
                                            and answer a mixed batch from two tenants
  prefixserve serve --port 50051            serve the default model (or --model DIR) over gRPC
  prefixserve generate "Why is the sky blue?"          ask a running server (streams the answer)
  prefixserve adapters load pirate --upload DIR        add an adapter (PEFT prompt learning)
  prefixserve adapters list                 adapters you can use

Client commands find the server with --server or $PREFIXSERVE_SERVER (default 127.0.0.1:50051)
and send --api-key or $PREFIXSERVE_API_KEY when the server has keys. `prefixserve CMD --help`
explains each command; from Python use prefixserve.client.Client.
"""
DEFAULT_SERVER = "127.0.0.1:50051"


# -- serve ----------------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    from .config import EngineConfig, engine_options
    from .server import serve
    from .server.config import server_config, server_options

    if not args.ray and (args.replicas is not None or args.ray_address is not None):
        raise ValueError("--replicas and --ray-address run engine replicas on Ray: add --ray")
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s"
    )
    engine = EngineConfig.from_kwargs(
        **{option.name: getattr(args, option.name) for option in engine_options()}
    )
    config = server_config({o.dest: getattr(args, o.dest) for o in server_options()}, engine)
    keys = (
        "open: no API keys" if config.api_keys.open else f"{len(config.api_keys.tenants)} tenants"
    )

    def ready(server: PrefixServer) -> None:
        print(f"prefixserve: serving on {server.address} ({keys}); Ctrl-C stops", flush=True)

    if args.ray:
        return _serve_on_ray(args, config, ready)
    asyncio.run(serve(config, on_ready=ready))
    return 0


def _serve_on_ray(
    args: argparse.Namespace, config: ServerConfig, ready: Callable[[PrefixServer], None]
) -> int:
    """``serve --ray``: the same gRPC API in front of engine replicas on Ray Serve."""
    from .scaleout.config import FleetConfig

    fleet = FleetConfig(
        replicas=FleetConfig().replicas if args.replicas is None else args.replicas,
        ray_address=args.ray_address,
        replica_cpus=args.replica_cpus,
        replica_gpus=args.replica_gpus,
    )
    require("ray", "prefixserve serve --ray (engine replicas on Ray Serve)")
    from .scaleout import run_fleet

    print(f"prefixserve: starting {fleet.replicas} engine replicas on Ray", flush=True)
    run_fleet(config, fleet, on_ready=ready)
    return 0


ENGINE_FLAG_ALIASES = {"cpu_kv_memory_gib": ("--kv-memory-gib",)}
"""Older spellings of engine flags that still work."""


def _add_engine_flags(group: argparse._ArgumentGroup) -> None:
    """One flag per engine option (``prefixserve.config``), its default and docstring as help."""
    from .config import engine_options

    for option in engine_options():
        flag = "--" + option.name.replace("_", "-")
        if option.annotation.startswith("bool"):  # --enforce-eager / --no-enforce-eager
            group.add_argument(
                flag,
                dest=option.name,
                action=argparse.BooleanOptionalAction,
                default=option.default,
                help=f"{option.help} (default: {option.default})".replace("%", "%%"),
            )
            continue
        group.add_argument(
            flag,
            *ENGINE_FLAG_ALIASES.get(option.name, ()),
            dest=option.name,
            type=_flag_type(option.annotation),
            default=option.default,
            metavar=option.name.rpartition("_")[2].upper(),
            help=f"{option.help} (default: {option.default})".replace("%", "%%"),
        )


def _add_server_flags(group: argparse._ArgumentGroup) -> None:
    """One flag per server option (``prefixserve.server.config``), its default and docstring
    as help."""
    from .server.config import server_options

    for option in server_options():
        flag, spec = "--" + option.dest.replace("_", "-"), option.flag
        shown = (
            ""
            if option.default is None
            else f" (default: {option.default:g})"
            if isinstance(option.default, float)
            else f" (default: {option.default})"
        )
        help_text = (option.help + shown).replace("%", "%%")
        if spec.repeat:
            group.add_argument(
                flag,
                dest=option.dest,
                action="append",
                default=[],
                metavar=spec.metavar,
                help=help_text,
            )
            continue
        annotation = option.annotation
        if annotation.startswith("bool"):
            group.add_argument(
                flag,
                dest=option.dest,
                action=argparse.BooleanOptionalAction,
                default=option.default,
                help=help_text,
            )
            continue
        if spec.unit != 1:  # a byte count given in MiB or KiB: fractions allowed
            annotation = annotation.replace("int", "float")
        if spec.text:  # a path, or 'none', for the config to read
            annotation = "str"
        group.add_argument(
            flag,
            dest=option.dest,
            type=_flag_type(annotation),
            default=option.default,
            metavar=spec.metavar
            or option.dest.removesuffix("_per_tenant").rpartition("_")[2].upper(),
            help=help_text,
        )


def _flag_type(annotation: str) -> Callable[[str], object]:
    """Parser of a flag's text for a field typed ``annotation``; 'none' gives None where the
    field is optional."""
    base: Callable[[str], object] = (
        int if annotation.startswith("int") else float if annotation.startswith("float") else str
    )
    if "None" not in annotation:
        return base

    def optional(text: str) -> object:
        return None if text.lower() == "none" else base(text)

    optional.__name__ = getattr(base, "__name__", "value")  # argparse names it in errors
    return optional


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over gRPC (generation, adapters, health, reflection, metrics)",
        description="Serve one model with many soft-prompt adapters over gRPC. The server "
        "listens at once; health says NOT_SERVING until the model and the adapters are loaded, "
        "then SERVING. SIGINT/SIGTERM shut it down gracefully.",
        epilog="API keys file: one 'TENANT KEY [admin]' per line ($PREFIXSERVE_API_KEYS takes "
        "the same entries separated by ';'). Tenants see only their own and public adapters; "
        "admins may load from server paths and load public adapters. Without keys the server is "
        "open and every adapter is public: keep it on localhost then.",
    )
    _add_engine_flags(
        p.add_argument_group(
            "engine", "model, KV pool, scheduling, attention ('none' sets an option to None)"
        )
    )
    _add_server_flags(
        p.add_argument_group("server", "listening, tenants, limits ('none' sets an option to None)")
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    _add_ray_flags(p.add_argument_group("replicas on Ray Serve (needs prefixserve[ray])"))
    p.set_defaults(func=_serve)


def _add_ray_flags(group: argparse._ArgumentGroup) -> None:
    from .scaleout.config import FleetConfig

    defaults = FleetConfig()
    group.add_argument(
        "--ray",
        action="store_true",
        help="serve the same API in front of engine replicas on a Ray cluster; requests go to "
        "the replicas that hold their adapter's prefix (Ray Serve model multiplexing)",
    )
    group.add_argument(
        "--replicas", type=int, help=f"engine replicas (with --ray; default {defaults.replicas})"
    )
    group.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="Ray cluster to join, e.g. HEAD:6379 or auto (default: the one started on this "
        "machine with `ray start`, else a new local one)",
    )
    group.add_argument(
        "--replica-cpus",
        type=float,
        default=defaults.replica_cpus,
        help="CPUs per replica (default %(default)s)",
    )
    group.add_argument(
        "--replica-gpus",
        type=float,
        default=defaults.replica_gpus,
        help="GPUs per replica: 1 on GPU nodes (default %(default)s)",
    )


# -- client commands ------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Client:
    from .client import Client

    return Client(args.server, args.api_key, tls=args.tls, root_certificates=args.tls_ca)


def _generate(args: argparse.Namespace) -> int:
    client = _client(args)
    prompt_text = sys.stdin.read() if args.prompt == "-" else args.prompt
    prompt: Prompt = prompt_text
    if not args.raw and client.model_info().has_chat_template:
        prompt = [{"role": "user", "content": prompt_text}]
    options = {
        k: getattr(args, k)
        for k in (
            "max_new_tokens",
            "temperature",
            "top_k",
            "top_p",
            "min_p",
            "repetition_penalty",
            "seed",
        )
    }
    last = None
    for last in client.generate_stream(prompt, args.adapter, stop=args.stop or None, **options):
        print(last.text, end="", flush=True)
    print()
    if last is not None and last.usage is not None:
        u = last.usage
        served = f"; replica {last.replica or '(none named)'}" if args.show_replica else ""
        print(
            f"[{last.finish_reason}; {u.prompt_tokens} prompt + {u.completion_tokens} "
            f"generated tokens{served}]",
            file=sys.stderr,
        )
    return 0


def _adapters(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.action == "load":
        a = client.load_adapter(
            args.name, path=args.path, upload=args.upload, text=args.text, public=args.public
        )
        print(
            f"loaded {a.name}: {a.kind}, {a.num_tokens} virtual tokens, "
            f"{'public' if a.public else 'owned by ' + a.owner}"
        )
    elif args.action == "unload":
        now = client.unload_adapter(args.name, owner=args.owner)
        print(f"unloaded {args.name}" + ("" if now else " (once its running requests end)"))
    else:
        adapters = client.list_adapters(all_tenants=args.all_tenants)
        print(
            f"{'NAME':<20} {'OWNER':<12} {'KIND':<14} {'TOKENS':>6} {'RESIDENT':>8} "
            f"{'REQUESTS':>8}  SOURCE"
        )
        for a in adapters:
            print(
                f"{a.name:<20} {a.owner or '(public)':<12} {a.kind:<14} {a.num_tokens:>6} "
                f"{'yes' if a.resident else 'no':>8} {a.requests:>8}  {a.source}"
            )
    return 0


def _client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server",
        default=env_server(DEFAULT_SERVER),
        help="host:port of a running `prefixserve serve` (default: "
        "$PREFIXSERVE_SERVER or %(default)s)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="the server's API key for you (default: "
        "$PREFIXSERVE_API_KEY); needed when the server has keys",
    )
    p.add_argument("--tls", action="store_true", help="connect with TLS (system roots)")
    p.add_argument("--tls-ca", metavar="PEM", help="TLS with this CA/self-signed certificate")


def _add_client_commands(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser(
        "generate",
        help="ask a running server and stream the answer to the terminal",
        description="Send one prompt to a running server and print the answer as it streams. "
        "The prompt is sent as a user chat message when the model has a chat template "
        "(--raw sends it as plain text). Greedy unless --temperature > 0.",
    )
    g.add_argument("prompt", help="the prompt text, or - to read it from stdin")
    g.add_argument("--adapter", help="an adapter you can use (see `prefixserve adapters list`)")
    g.add_argument("--raw", action="store_true", help="send the text as is (no chat template)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--min-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument(
        "--show-replica",
        action="store_true",
        help="print which replica served the answer (servers started with --ray)",
    )
    _client_options(g)
    g.set_defaults(func=_generate)

    a = sub.add_parser(
        "adapters",
        help="load, list or unload adapters on a running server",
        description="Manage the adapters of a running server. Adapters you load belong to your "
        "tenant (your API key) and are invisible to other tenants; they are kept in the "
        "server's registry and come back after a restart.",
    )
    actions = a.add_subparsers(dest="action", required=True)
    load = actions.add_parser(
        "load",
        help="load an adapter under a name",
        description="Load a PEFT prompt-learning adapter (prompt tuning, "
        "P-tuning, prefix tuning, cartridge; adapter_config.json + "
        "adapter_model.safetensors) or a system prompt.",
    )
    load.add_argument("name", help="1-64 letters, digits, '.', '_' or '-'")
    source = load.add_mutually_exclusive_group(required=True)
    source.add_argument("--upload", metavar="DIR", help="a local adapter directory to upload")
    source.add_argument(
        "--path", metavar="DIR", help="an adapter directory on the server (admin keys only)"
    )
    source.add_argument("--text", help="a system prompt to use as the prefix")
    load.add_argument("--public", action="store_true", help="usable by every tenant (admins)")
    unload = actions.add_parser("unload", help="unload an adapter (after its running requests)")
    unload.add_argument("name")
    unload.add_argument(
        "--owner", metavar="TENANT", help="unload this tenant's private adapter (admin keys only)"
    )
    listing = actions.add_parser("list", help="the adapters you can use")
    listing.add_argument("--all-tenants", action="store_true", help="every tenant's (admins)")
    for p in (load, unload, listing):
        _client_options(p)
    a.set_defaults(func=_adapters)


# -- demo -----------------------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    from .server.demo import run_demo

    return run_demo(
        args.model, args.dtype, args.max_new_tokens, args.adapters_dir, compiled=args.compile
    )


def _add_demo(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo",
        help="start a server with the example adapters and send it a mixed batch from two tenants",
        description="Start a gRPC server in this process on the default model with the example "
        "adapters (examples/adapters; text stand-ins for any missing), then two tenants stream "
        "a mixed batch of chat requests through it: their own adapters, public ones and none. "
        "Prints each answer beside its tenant and adapter, and the throughput.",
    )
    demo.add_argument("--model", help="HF model directory (default: the embedded SmolLM2-135M)")
    demo.add_argument(
        "--dtype",
        default="auto",
        help="auto (bf16 on CPUs with a bf16 dot product, AVX512-BF16 or AMX; fp32 on others),"
        " float32, bfloat16 or float16",
    )
    demo.add_argument("--max-new-tokens", type=int, default=48, help="tokens per answer at most")
    demo.add_argument(
        "--adapters-dir",
        type=Path,
        help="folder of adapter directories (default: the repository's examples/adapters)",
    )
    demo.add_argument(
        "--compile",
        action="store_true",
        help="compile the model's forward as `serve` does (faster steps after minutes of "
        "warm-up on a small CPU; the demo's few answers run eagerly by default)",
    )
    demo.set_defaults(func=_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefixserve",
        description="Serve one frozen language model with many soft-prompt adapters.",
        epilog=GUIDE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(sub)
    _add_serve(sub)
    _add_client_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import grpc

    try:
        return int(args.func(args))
    except grpc.RpcError as e:
        print(f"prefixserve: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except (ValueError, OSError, MissingExtraError) as e:
        print(f"prefixserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
