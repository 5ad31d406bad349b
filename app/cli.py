"""The `moe` command: chat (the app), web, attach, serve, generate, info, profile, plan and bench."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from moe_tui.inference.cache import DECAY_HALF_LIFE, DEFAULT_POLICY, LRFU_HALF_LIFE, POLICIES
from moe_tui.inference.demo_paths import DEMO_CAPACITY, DEMO_MODEL, DEMO_PROFILE
from moe_tui.inference.errors import ModelLoadError

from .commands import parse_capacity


def _capacity(value: str) -> int | float:
    try:
        return parse_capacity(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _whole(low: int):
    """An argparse type: a whole number at least `low`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from exc
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be at least {low}")
        return value

    return parse


_positive, _non_negative = _whole(1), _whole(0)


def _number(low: float, high: float | None = None, above: bool = False):
    """An argparse type: a finite number at least `low` (above it with `above`), at most `high`."""
    import math

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from exc
        if not math.isfinite(value) or value < low or (above and value == low) or (high is not None and value > high):
            bound = f"above {low:g}" if above else f"from {low:g}" + (f" to {high:g}" if high is not None else " up")
            raise argparse.ArgumentTypeError(f"{text} must be a number {bound}")
        return value

    return parse


def _file(text: str) -> Path:
    """An argparse type: a file to read or write, not a folder (a usage error, not a traceback). A missing one
    is said where it is read: `moe web` passes the path on to each session's `moe chat`."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file")
    return path


def _mode(text: str) -> str:
    from moe_tui.inference.expert_cache import FAST_REMOVED

    if text == "fast":
        raise argparse.ArgumentTypeError(FAST_REMOVED)
    if text != "exact":
        raise argparse.ArgumentTypeError(f"{text!r}: the engine has one mode, exact")
    return text


def _add_engine_args(p: argparse.ArgumentParser, model_optional: bool = False) -> None:
    if model_optional:
        p.add_argument("model", nargs="?", default=None, help="model folder or Hugging Face repo id (default: demo)")
    else:
        p.add_argument("model", help="model folder or Hugging Face repo id")
    p.add_argument("--capacity", type=_capacity, default=None,
                   help="experts cached per MoE layer: count, fraction or percent (default: fit available memory)")
    p.add_argument("--mode", type=_mode, default="exact", help=argparse.SUPPRESS)  # kept for old scripts
    p.add_argument("--policy", choices=POLICIES, default=DEFAULT_POLICY,
                   help="which cached expert to evict: least recently used, least often, by use counts decayed "
                        f"with a half-life of {DECAY_HALF_LIFE:g} (decay) or {LRFU_HALF_LIFE:g} steps (lrfu), or "
                        "lrfu plus how often each expert followed the latest step's experts so far (markov) "
                        f"(default: {DEFAULT_POLICY})")
    p.add_argument("--profile", type=_file, default=None, help="expert profile JSON to warm and pin from")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=None,
                   help="pin the profile's universal experts (default: yes for --profile, no for the demo's own)")
    p.add_argument("--kv-bits", type=int, default=None, choices=(4, 8), help="quantize the KV cache")
    p.add_argument("--context", type=_positive, default=None, metavar="TOKENS",
                   help="context to allow, in tokens (default: the model's); an automatic --capacity keeps its KV "
                        "cache's memory free")
    p.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=None,
                   help="predict each next layer's experts and read them while this one computes (outputs "
                        "unchanged; default: only while that makes decoding faster, timed as it runs)")


def _add_chat_args(p: argparse.ArgumentParser) -> None:
    _add_engine_args(p, model_optional=True)
    p.add_argument("--data-dir", type=Path, default=None, help="where chats are stored (default: user data dir)")
    p.add_argument("--base-url", default=None,
                   help="chat through any OpenAI-compatible server (vLLM, SGLang, llama.cpp...) instead")
    p.add_argument("--model", dest="remote_model", default=None, help="model name on the --base-url server")
    p.add_argument("--api-key", default=None, help="key for --base-url (or MOE_API_KEY / OPENAI_API_KEY)")


def _port(text: str) -> int:
    value = _positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (1-65535)")
    return value


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moe-tui")
    except PackageNotFoundError:  # a checkout run without installing
        return "unknown (not installed)"


HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


def ensure_local(model: str) -> str:
    """A local folder as is; a Hugging Face repo id from the hub cache, else downloaded with progress bars."""
    path = Path(model).expanduser()
    if path.exists() or model.count("/") != 1 or model.startswith(("/", ".", "~")):
        return model  # a path, not a repo id: the engine reports a missing folder clearly
    from huggingface_hub import snapshot_download
    from moe_tui.inference.loading import check_hub_reachable, hub_offline

    try:
        return snapshot_download(model, local_files_only=True, allow_patterns=HUB_PATTERNS)
    except Exception:  # noqa: BLE001 - not (fully) cached: try the network below
        pass
    if hub_offline():
        raise ModelLoadError(f"{model}: not in the local Hugging Face cache, and HF_HUB_OFFLINE is set; "
                             f"download it with network access first (`hf download {model}`)")
    check_hub_reachable(model)
    print(f"moe: downloading {model} from the Hugging Face hub...", file=sys.stderr)
    try:
        return snapshot_download(model, allow_patterns=HUB_PATTERNS)
    except Exception as exc:  # noqa: BLE001 - hub errors vary: offline, 404, auth
        raise ModelLoadError(f"{model}: could not download ({type(exc).__name__}: {exc}); check the network "
                             "connection and the repo id, or pass a local folder") from exc


def _profile(args, demo: bool) -> tuple[Path | None, bool]:
    """The profile to warm from and whether to pin from it. The demo warms from its own profile without
    pins: pinning its universal experts lowered the hit rate at every capacity measured (scripts/pins.py)."""
    if args.profile is not None:
        return args.profile, args.pin is not False
    if demo and DEMO_PROFILE.exists():
        return DEMO_PROFILE, bool(args.pin)
    return None, False


def _load(args):
    from moe_tui.inference.engine import Engine

    model = ensure_local(args.model) if args.model else str(DEMO_MODEL)
    profile, pin = _profile(args, demo=args.model is None)
    return Engine.load(model, capacity=args.capacity, policy=args.policy, profile=profile,
                       pin=pin, kv_bits=args.kv_bits, context=args.context, prefetch=args.prefetch)


def cmd_info(args) -> int:
    engine = _load(args)
    layout = engine.layout
    info = {**layout.__dict__, "moe_layers": list(layout.moe_layers), "capacity": engine.capacity,
            "cache_bytes": engine.cache_bytes(), "all_experts_bytes": layout.all_experts_bytes,
            # `moe pack`: the expert records misses are read from, or why records there are not used
            "expert_records": str(engine.experts.pack) if engine.experts.pack else None,
            "expert_records_note": engine.experts.pack_note or None,
            # what the other flags set: the policy, reads ahead (auto: while they pay), KV cache, context, pins
            "policy": engine.policy,
            "reads_ahead": {None: "auto", True: "on", False: "off"}[engine.experts.prefetch],
            "kv_bits": engine.kv_bits, "context_length": engine.context_length,
            "pinned_experts": int(engine.snapshot().pinned.sum())}
    print(json.dumps(info, indent=2))
    return 0


def cmd_generate(args) -> int:
    from moe_tui.inference.telemetry import GenerationDone

    engine = _load(args)
    prompt = engine.encode([{"role": "user", "content": args.prompt}] if not args.raw else args.prompt)
    room = engine.context_length - len(prompt)  # the reply stops at the context (--context, else the model's)
    if room < 1:
        raise ModelLoadError(f"the prompt takes {len(prompt)} tokens, over the context of {engine.context_length} "
                             "tokens; give a shorter prompt" + (" or a larger --context" if args.context else ""))
    budget = min(args.max_tokens, room)
    for event in engine.stream(prompt, max_tokens=budget, temperature=args.temperature):
        if isinstance(event, GenerationDone):
            if not event.text.endswith("\n"):
                print(flush=True)  # the reply's line ends on stdout, also when it goes to a file
            snap = engine.snapshot()
            ended = (" (end of the model's reply)" if event.finish_reason == "stop" else
                     f" (stopped at {'--max-tokens' if budget == args.max_tokens else 'the context'})")
            print(f"[{event.generated_tokens} tokens{ended}, prefill {event.prefill_tps:.1f} tok/s, decode "
                  f"{event.decode_tps:.1f} tok/s, hit rate {snap.hit_rate:.1%}, {snap.bytes_read / 2**20:.1f} MiB "
                  f"of experts read]", file=sys.stderr)
        else:
            print(event.text, end="", flush=True)
    return 0


def cmd_profile(args) -> int:
    """Route prompts (generating) or a text (read token by token) and write a profile and/or a trace."""
    from moe_tui.inference.profiles import build_profile

    if args.out is None and args.trace is None:
        raise ValueError("profile: nothing to write; give --out PROFILE.json and/or --trace TRACE.npz")
    if args.trace is not None and args.prefetch is None:
        args.prefetch = True  # predict at every decode step (not only while reading ahead pays): all guesses kept
    prompts = None if args.text else _read_prompts(args.prompts)  # a bad file is said before the model loads
    engine = _load(args)
    if args.capacity is None:
        engine.set_capacity(1.0)  # exact routing is the same at every capacity; below full it records guesses
    recorder = None
    if args.trace is not None:
        from moe_tui.inference.traces import TraceRecorder

        recorder = TraceRecorder(engine, source="moe " + " ".join(sys.argv[1:]))
    runs = _text_windows(engine, args) if args.text else prompts
    per_prompt, tokens = [], 0
    for run in runs:
        if recorder is not None:
            recorder.begin()
        else:
            engine.reset_stats()
        engine.reset_prompt_cache()
        if args.text:
            engine.route_tokens(run)
        else:
            for _event in engine.stream([{"role": "user", "content": run}], max_tokens=args.max_tokens):
                pass
        snap = engine.snapshot()
        per_prompt.append(snap.requests.copy())
        run_tokens = int(snap.requests[0].sum()) // max(engine.layout.top_k, 1) if snap.num_moe_layers else 0
        tokens += run_tokens
        if recorder is not None:
            recorder.collect(run_tokens)
    what = "text windows" if args.text else "prompts"
    if args.out is not None:
        profile = build_profile(args.model or "demo", engine.layout, per_prompt, tokens)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(profile, indent=1) + "\n")
        print(f"wrote {args.out}: {len(runs)} {what}, {tokens} tokens, "
              f"{sum(len(u) for u in profile['universal'])} universal experts", file=sys.stderr)
    if recorder is not None:
        from moe_tui.inference.traces import save_trace

        trace = recorder.trace()
        recorder.close()
        save_trace(trace, args.trace)
        guessed = "with" if trace.guesses is not None else "without"
        print(f"wrote {args.trace}: {len(runs)} {what}, {trace.num_steps} steps, {tokens} tokens, {guessed} "
              "next-layer guesses", file=sys.stderr)
    return 0


def _text_windows(engine, args) -> list[list[int]]:
    """The text's tokens (at most --tokens), cut into windows of --window tokens."""
    text = _read_text(args.text)
    if args.tokens:
        text = text[: args.tokens * 8]  # ample: the demo's tokenizer averages ~3.8 bytes a token on Python text
    ids = list(engine.tokenizer.encode(text))[: args.tokens]
    if not ids:
        raise ValueError(f"{args.text}: no text to route")
    window = min(args.window, engine.context_length)
    return [ids[i : i + window] for i in range(0, len(ids), window)]


def _read_text(path: Path) -> str:
    """A text file given on the command line (undecodable bytes replaced), or ValueError saying why not."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def _read_prompts(path: Path) -> list[str]:
    text = _read_text(path)
    if path.suffix == ".json":
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{path}: expected a JSON list of prompt strings")
        prompts = [p for p in prompts if p.strip()]
        if not prompts:
            raise ValueError(f"{path}: no prompts (a JSON list of prompt strings)")
        return prompts
    prompts = [block.strip() for block in text.split("\n\n") if block.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per paragraph, separated by blank lines)")
    return prompts


def cmd_chat(args) -> int:
    """Open the Textual app on a model (default: the built-in demo)."""
    from .main import MoeApp
    from .settings import load_settings
    from .worker import EngineSpec

    settings = load_settings()
    if args.data_dir:
        settings.data_dir = str(args.data_dir)
    if args.base_url:
        return run_remote(settings, args.base_url, args.remote_model or args.model, args.api_key, telemetry=False)
    model = args.model or settings.default_model
    model = ensure_local(model) if model else str(DEMO_MODEL)
    from moe_tui.inference.loading import check_model_folder

    check_model_folder(model)  # a wrong path is a one-line error here, not a broken screen
    profile, pin = _profile(args, demo=model == str(DEMO_MODEL))
    if model == str(DEMO_MODEL):
        # The demo fits in memory many times over; half the experts per layer shows the cache at work.
        args.capacity = args.capacity if args.capacity is not None else DEMO_CAPACITY
    spec = EngineSpec(model=model, capacity=args.capacity, policy=args.policy,
                      profile=str(profile) if profile else None, pin=pin, kv_bits=args.kv_bits,
                      context=args.context, prefetch=args.prefetch)
    MoeApp(spec, settings).run()
    return 0


def cmd_web(args) -> int:
    """Serve the app to browsers: the model is found (or downloaded) and checked once here, and each session
    runs `moe chat` on the resolved path."""
    from . import web
    from .settings import load_settings
    from .store import DataDirLock

    warning = web.prepare(args)
    settings = load_settings()
    if args.data_dir:
        settings.data_dir = str(args.data_dir)
    probe = DataDirLock(settings.resolved_data_dir() / "chats.sqlite3")
    probe.acquire()  # StoreInUse now, not in every browser session, when another app has these chats open
    probe.release()
    model = None
    if args.base_url:
        check_server(args.base_url)
    elif args.model or settings.default_model:
        from moe_tui.inference.loading import check_model_folder

        model = ensure_local(args.model or settings.default_model)
        check_model_folder(model)
    web.resolve_paths(args, model)
    if args.api_key:  # to the sessions through their environment, not their command line (visible in `ps`)
        os.environ["MOE_API_KEY"] = args.api_key
        args.api_key = None
    if warning:
        print(warning, file=sys.stderr)
    chat_args = web.chat_argv(build_parser().subcommands["web"], args)
    title = "moe: " + (args.base_url or (Path(model).name if model else "demo model"))
    web.serve(chat_args, host=args.host, port=args.port, public_url=args.public_url, title=title)
    return 0


def run_remote(settings, base_url: str, model: str | None, api_key: str | None, telemetry: bool) -> int:
    from .main import MoeApp
    from .remote import RemoteWorker
    from .worker import EngineSpec

    api_key = api_key or os.environ.get("MOE_API_KEY") or os.environ.get("OPENAI_API_KEY")
    check_server(base_url)
    MoeApp(EngineSpec(model=base_url), settings, worker_factory=lambda app: RemoteWorker(
        app, base_url, model=model, api_key=api_key, telemetry=telemetry, stats_hz=settings.refresh_hz)).run()
    return 0


def check_server(base_url: str) -> None:
    """A one-line error before the app opens when the address is malformed or nothing answers there.

    Raises:
        ValueError: not an http(s) URL, or no server answers (refused, unknown host, timeout).
    """
    import httpx

    if not base_url.startswith(("http://", "https://")):
        raise ValueError(f"{base_url}: a server address starts with http:// or https://")
    try:
        httpx.get(base_url.rstrip("/").removesuffix("/v1") + "/v1/models", timeout=5.0)
    except httpx.InvalidURL as exc:
        raise ValueError(f"{base_url}: not a valid address ({exc})") from exc
    except httpx.TransportError as exc:
        raise ValueError(f"{base_url}: no server answers there ({type(exc).__name__}: {exc})") from exc


def cmd_attach(args) -> int:
    from .settings import load_settings

    settings = load_settings()
    if args.data_dir:
        settings.data_dir = str(args.data_dir)
    return run_remote(settings, args.url, None, args.api_key, telemetry=True)


def cmd_serve(args) -> int:
    from moe_tui.inference.server import serve

    model = ensure_local(args.model) if args.model else str(DEMO_MODEL)
    profile, pin = _profile(args, demo=args.model is None)
    serve(model, host=args.host, port=args.port, api_key=args.api_key, max_queue=args.max_queue,
          max_tokens_cap=args.max_tokens_cap, capacity=args.capacity, policy=args.policy,
          profile=profile, pin=pin, kv_bits=args.kv_bits, context=args.context, prefetch=args.prefetch,
          allowed_hosts=args.allow_host,
          allowed_origins=args.allow_origin, request_timeout=args.request_timeout,
          max_connections=args.max_connections, access_log=args.access_log, tool_parser=args.tool_parser)
    return 0


def cmd_plan(args) -> int:
    """Will the model fit, with how many experts per layer, how fast could the disk feed it: no weight loaded."""
    import json

    from moe_tui.inference.loading import check_model_folder
    from moe_tui.inference.plan import format_plan, make_plan, parse_size
    from moe_tui.inference.profiles import load_profile

    model = args.model or str(DEMO_MODEL)
    if Path(model).expanduser().exists():
        model = str(Path(model).expanduser())
        check_model_folder(model)
    elif model.count("/") == 1 and not model.startswith(("/", ".", "~")):
        from huggingface_hub import snapshot_download

        try:  # a repo in the local hub cache is read from there; else only its headers are fetched
            model = snapshot_download(model, local_files_only=True, allow_patterns=HUB_PATTERNS)
        except Exception:  # noqa: BLE001 - not cached
            pass
    else:
        check_model_folder(model)  # names the missing folder
    profile_path, _ = _profile(args, demo=args.model is None)
    plan = make_plan(model, memory=parse_size(args.memory) if args.memory else None, context=args.context,
                     kv_bits=args.kv_bits, profile=load_profile(profile_path) if profile_path else None,
                     bandwidth=args.bandwidth * 2**20 if args.bandwidth else None, measure=not args.no_measure)
    if args.json:
        json.dump(plan.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_plan(plan))
    return 0 if plan.fits else 1


def cmd_pack(args) -> int:
    """Write a model's expert records (one contiguous record per expert: a miss is one read) where the engine
    finds them."""
    import time

    from moe_tui.inference.packed import pack_model

    model = ensure_local(args.model)
    started = time.perf_counter()

    shown = []  # a progress line is on the terminal, unfinished

    def progress(done: int, total: int) -> None:
        shown[:] = [done < total]
        print(f"\rmoe pack: layer {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    try:
        out, nbytes, written = pack_model(model, progress=progress, force=args.force)
    except ModelLoadError as e:
        print(("\n" if any(shown) else "") + f"moe pack: {e}", file=sys.stderr)
        return 1
    done = (f"{nbytes / 2**30:.2f} GiB of expert records in {out} ({time.perf_counter() - started:.0f} s)" if written
            else f"the expert records in {out} are up to date ({nbytes / 2**30:.2f} GiB; --force writes them again)")
    print(f"moe pack: {done}. The engine reads this model's misses from them whenever it loads it unchanged; "
          "delete the folder to stop.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe", description="Run and watch Mixture-of-Experts models. `moe` alone opens the chat on the "
        "built-in demo model (offline); `moe MODEL` or `moe chat MODEL` on another one.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("chat", help="open the app on a model (default: the built-in demo)")
    _add_chat_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("web", help="serve the app to a web browser (each connection runs `moe chat` with the same "
                                   "options); loopback only by default")
    _add_chat_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1; any other is reachable by others, who could use "
                        "the app and its commands)")
    p.add_argument("--port", type=_port, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--public-url", default=None, metavar="URL",
                   help="the address browsers use to reach this server, when it is not http://HOST:PORT (a tunnel "
                        "to another local port, a proxy, or --host 0.0.0.0)")
    p.set_defaults(func=cmd_web)

    p = sub.add_parser("attach", help="open the app on a running `moe serve` (chat, heatmap and gauges)")
    p.add_argument("url", help="the server's address, e.g. http://127.0.0.1:8080")
    p.add_argument("--api-key", default=None, help="the server's key (or MOE_API_KEY)")
    p.add_argument("--data-dir", type=Path, default=None, help="where chats are stored (default: user data dir)")
    p.set_defaults(func=cmd_attach)

    p = sub.add_parser("generate", help="generate one reply and print cache stats")
    _add_engine_args(p, model_optional=True)
    p.add_argument("--prompt", required=True, help="the user message (or the raw prompt with --raw)")
    p.add_argument("--raw", action="store_true", help="no chat template")
    p.add_argument("--max-tokens", type=_positive, default=128, help="longest reply in tokens (default: 128)")
    p.add_argument("--temperature", type=_number(0.0, 2.0), default=0.0,
                   help="sampling temperature, 0 to 2; 0 is greedy (default: 0)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="model layout and cache size as JSON")
    _add_engine_args(p, model_optional=True)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("profile", help="record expert routing on prompts into a profile JSON")
    _add_engine_args(p, model_optional=True)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", type=_file, help="text file (blank-line separated) or JSON list")
    source.add_argument("--text", type=_file,
                        help="a text file read token by token, as if generated (no chat template, no generation)")
    p.add_argument("--out", type=_file, default=None, help="where to write the profile JSON")
    p.add_argument("--trace", type=_file, default=None, metavar="OUT.npz",
                   help="also (or only) write the routing trace, for `moe bench --replay` (docs/traces.md)")
    p.add_argument("--max-tokens", type=_positive, default=64, help="tokens generated per prompt (default: 64)")
    p.add_argument("--tokens", type=_positive, default=None, help="--text: read at most this many tokens of it")
    p.add_argument("--window", type=_positive, default=1024,
                   help="--text: tokens per KV cache; a new window starts from an empty context (default: 1024)")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("serve", help="OpenAI- and Anthropic-compatible HTTP server with cache telemetry")
    _add_engine_args(p, model_optional=True)
    p.add_argument("--host", default="127.0.0.1", help="bind address (non-loopback needs an API key)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default: 8080)")  # serve() checks
    p.add_argument("--api-key", default=None, help="require this key (or set MOE_API_KEY)")
    p.add_argument("--max-queue", type=_non_negative, default=16,
                   help="requests waiting before 429 (0: no bound; default: 16)")
    p.add_argument("--max-tokens-cap", type=_positive, default=4096,
                   help="largest max_tokens a request may ask (default: 4096, at most the context)")
    p.add_argument("--allow-host", action="append", default=[], metavar="HOST",
                   help="also answer requests whose Host header names HOST (any port; repeatable; '*' for any). "
                        "On loopback only localhost, 127.0.0.1 and [::1] are answered, against DNS rebinding")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. http://localhost:3000; repeatable; '*' for any) call the "
                        "server, with CORS; by default requests carrying an Origin header get 403")
    p.add_argument("--request-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="close connections whose request headers, or whose body, take longer than this (default 30)")
    p.add_argument("--max-connections", type=int, default=64, metavar="N",
                   help="open connections kept (the oldest idle are closed to make room) and requests run at once; "
                        "beyond that, 503 (default 64)")
    p.add_argument("--access-log", action="store_true", help="log each request (off by default)")
    p.add_argument("--tool-parser", default=None, metavar="NAME",
                   help="read tool calls with mlx-lm's parser NAME (json_tools, qwen3_coder, glm47, mistral, ...) "
                        "instead of the one inferred from the model's chat template")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("plan", help="will a model fit in memory, with how many experts per layer, how fast could the "
                                    "disk feed it (reads config and file headers only; exit 1: does not fit)")
    p.add_argument("model", nargs="?", default=None, help="model folder or Hugging Face repo id (default: demo)")
    p.add_argument("--memory", default=None, metavar="SIZE",
                   help="memory to plan for, e.g. 16G (default: what is available now)")
    p.add_argument("--context", type=_positive, default=None, metavar="TOKENS",
                   help="tokens of KV cache to reserve (default: 8192, at most the model's context)")
    p.add_argument("--kv-bits", type=int, default=None, choices=(4, 8), help="a quantized KV cache")
    p.add_argument("--profile", type=_file, default=None,
                   help="an expert profile of this model, for the expected hit rate (default: the demo's own)")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=None, help=argparse.SUPPRESS)
    p.add_argument("--bandwidth", type=_number(0.0, above=True), default=None, metavar="MIB_S",
                   help="the disk's read speed in MiB/s (default: measured by reading 256 MiB of the model "
                        "bypassing the page cache)")
    p.add_argument("--no-measure", action="store_true", help="do not read the disk to measure its speed")
    p.add_argument("--json", action="store_true", help="the plan as JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("pack", help="copy a model's experts into one contiguous record each (in the user cache "
                                    "folder), so that a miss is one read instead of one per parameter")
    p.add_argument("model", help="model folder or Hugging Face repo id")
    p.add_argument("--force", action="store_true",
                   help="write them again even when up to date, or where every expert parameter is already a large "
                        "read (no faster there)")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("bench", help="stock mlx-lm vs the engine: JSON to stdout, table to stderr")
    p.add_argument("model", nargs="?", default=None, help="model folder or Hugging Face repo id")
    p.add_argument("--synthetic", action="store_true", help="benchmark a generated model (experts ~95%% of weights)")
    p.add_argument("--quantized", action="store_true",
                   help="--synthetic, --offload: the synthetic checkpoint in 4 bits with bf16 scales and biases (the "
                        "format of mlx-community's 4-bit models)")
    p.add_argument("--prompt-tokens", type=_positive, default=64, help="prompt length (default: 64)")
    p.add_argument("--decode-tokens", type=_positive, default=64, help="tokens decoded per run (default: 64)")
    p.add_argument("--repeats", type=_positive, default=2, help="runs per configuration (default: 2)")
    p.add_argument("--offload", action="store_true",
                   help="the engine on a checkpoint the page cache cannot hold (memory cgroup per run where "
                        "possible): per capacity and mode, decode speed, bytes read and read stall per token, "
                        "the compute and I/O limits, and prefill below 100%% against 100%% with the files warm")
    p.add_argument("--offload-model", default=None, metavar="PATH",
                   help="--offload: this checkpoint (made there if PATH does not exist; default: a synthetic one "
                        "in a temporary folder, removed afterwards)")
    p.add_argument("--offload-size", choices=("full", "medium", "small", "tiny"), default="full",
                   help="--offload: synthetic checkpoint size: full ~2.3 GiB, medium ~0.6, small ~0.2, tiny ~3 MB")
    p.add_argument("--offload-capacities", default="12.5,25,50,100", metavar="PERCENTS",
                   help="--offload: expert cache capacities in percent (default 12.5,25,50,100)")
    p.add_argument("--offload-modes", default="exact,exact-prefetch,exact-noprefetch",
                   help="--offload: configurations to run: exact (reads ahead while they pay, the default), "
                        "exact-prefetch (always), exact-noprefetch (never), exact-cached (reads through the page "
                        "cache), exact-unpacked (misses read from the checkpoint, not the expert records the "
                        "benchmark makes where they pay) (default exact,exact-prefetch,exact-noprefetch)")
    p.add_argument("--offload-headroom", type=int, default=512, metavar="MIB",
                   help="--offload: memory cgroup limit above dense weights + expert cache (default 512)")
    p.add_argument("--offload-no-cgroup", action="store_true",
                   help="--offload: no memory cgroup, only drop the page cache before each run")
    p.add_argument("--trace", type=Path, default=None, metavar="OUT.npz",
                   help="write the routing trace of the run at the smallest capacity that reads ahead at every step "
                        "(docs/traces.md)")
    p.add_argument("--replay", type=Path, default=None, metavar="TRACE.npz",
                   help="no model: replay a recorded trace; every policy (with and without the recorded "
                        "next-layer guesses) beside Belady's optimum, and a memory budget shared across layers")
    p.add_argument("--replay-capacities", default="12.5,25,50,75", metavar="PERCENTS",
                   help="--replay: cache capacities in percent of the experts per layer (default 12.5,25,50,75)")
    p.add_argument("--offload-calibrate", action="store_true",
                   help="--offload: search the synthetic routing's embedding scale against the demo's hit rates")
    p.set_defaults(func=_bench)
    parser.commands = tuple(sub.choices)
    parser.subcommands = sub.choices
    for command in (parser, *sub.choices.values()):
        command.allow_abbrev = False  # `--mode` must not be taken for `--model`
    return parser


def with_command(argv: list[str], commands: tuple[str, ...]) -> list[str]:
    """`moe [ARGS]` without a command is `moe chat [ARGS]`: `moe --capacity 8`, `moe ./my-model`."""
    if argv and (argv[0] in commands or argv[0] in ("-h", "--help", "--version")):
        return argv
    return ["chat", *argv]


def _bench(args) -> int:
    if args.replay is not None:
        from moe_tui.inference.oracle import replay_main

        return replay_main(args.replay, _percents(args.replay_capacities))
    if args.offload or args.offload_calibrate:
        from moe_tui.inference.offload_bench import main as offload_main

        return offload_main(args)
    from moe_tui.inference.bench import main as bench_main

    if not args.synthetic and args.model is None:
        args.model = str(DEMO_MODEL)
    return bench_main(args)


def _percents(text: str) -> list[float]:
    try:
        values = [float(v) / 100 for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ValueError(f"capacities {text!r}: expected percents separated by commas, e.g. 12.5,25,50") from exc
    if not values or not all(0 < v <= 1 for v in values):
        raise ValueError(f"capacities {text!r}: each percent must be in (0, 100]")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(with_command(list(sys.argv[1:] if argv is None else argv), parser.commands))
    try:
        status = args.func(args)
        sys.stdout.flush()  # a reader that left (| head) is seen here, not at exit as a traceback
        return status
    except BrokenPipeError:  # the reader of our output left: the rest goes nowhere, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a process ended by SIGPIPE
    except KeyboardInterrupt:  # Ctrl+C: what was under way stops (a server shuts down first); no traceback
        print(file=sys.stderr)
        return 130
    except ModelLoadError as exc:
        print(f"moe: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"moe: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
