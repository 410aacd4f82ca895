"""`lmscale serve --replicas N | --autoscale MIN:MAX`: the same API over engine replicas on Ray Serve.

Without `ray_address` a local Ray instance is started, sized to this machine (one logical CPU
per core), and shut down on exit; with one, the deployment joins that cluster (every node needs
lmscale installed, as in `deploy/rayservice.yaml`). Each engine replica asks Ray for `threads`
CPUs and runs that many torch threads, so N replicas never oversubscribe the cores they were
given. The ingress and the stats hub take no CPU of Ray's: they only move bytes.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass

from lmscale.errors import LmscaleError
from lmscale.serve.server import ServeOptions, api_key, served_name

APP_NAME = "lmscale"


@dataclass
class ScaleOptions:
    replicas: int = 1
    """A fixed number of engine replicas (ignored with `autoscale`)."""
    autoscale: tuple[int, int] | None = None
    """(min, max) replicas, scaled on ongoing requests per replica."""
    target_ongoing_requests: float = 8.0
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0
    threads: int | None = None
    """Torch threads (and Ray CPUs) per replica; default: this machine's cores over the most
    replicas, at least 1."""
    routing: str = "prefix"
    """"prefix" (to the replica caching the prompt's prefix) or "power-of-two" (Ray's default)."""
    ray_address: str | None = None
    num_cpus: int | None = None
    """CPUs of the local Ray instance (default: this machine's)."""
    metrics_interval_s: float | None = None
    """How often replicas report their load to the autoscaler (Ray's default if None)."""

    @property
    def max_replicas(self) -> int:
        return self.autoscale[1] if self.autoscale else self.replicas


def parse_autoscale(text: str) -> tuple[int, int]:
    """'MIN:MAX' as two integers, 0 <= MIN <= MAX, MAX >= 1."""
    low, sep, high = text.partition(":")
    if not (sep and low.isdigit() and high.isdigit()):
        raise LmscaleError(f"--autoscale must be MIN:MAX (e.g. 1:4), got '{text}'")
    low, high = int(low), int(high)
    if high < 1 or low > high:
        raise LmscaleError(f"--autoscale needs 0 <= MIN <= MAX and MAX >= 1, got '{text}'")
    return low, high


def threads_per_replica(scale: ScaleOptions) -> int:
    if scale.threads is not None:
        return scale.threads
    cpus = scale.num_cpus or os.cpu_count() or 1
    return max(1, cpus // scale.max_replicas)


def engine_deployment_options(options: ServeOptions, scale: ScaleOptions) -> dict:
    """Ray Serve's options for the engine deployment."""
    from ray.serve.config import RequestRouterConfig

    from lmscale.engine.config import EngineConfig

    engine = options.engine or EngineConfig()
    deployment = {
        "name": "engine",
        "ray_actor_options": {"num_cpus": threads_per_replica(scale)},
        # A replica takes as many streams as its engine batches; past that Ray's router holds
        # requests (up to max_queued_requests, then a 429), rather than the engine's queue.
        "max_ongoing_requests": engine.max_num_seqs,
        "max_queued_requests": engine.max_waiting,
        "graceful_shutdown_timeout_s": options.drain_s,
        "graceful_shutdown_wait_loop_s": 0.5,
        "health_check_period_s": 2.0,
    }
    if scale.routing == "prefix":
        from lmscale.serve.prefix_router import PrefixAwareRouter

        deployment["request_router_config"] = RequestRouterConfig(
            request_router_class=PrefixAwareRouter,
            request_router_kwargs={"block_size": engine.block_size},
        )
    elif scale.routing != "power-of-two":
        raise LmscaleError(f"--routing must be prefix or power-of-two, got '{scale.routing}'")
    if scale.autoscale:
        low, high = scale.autoscale
        autoscaling = {
            "min_replicas": low, "max_replicas": high, "initial_replicas": max(low, 1),
            "target_ongoing_requests": scale.target_ongoing_requests,
            "upscale_delay_s": scale.upscale_delay_s, "downscale_delay_s": scale.downscale_delay_s,
        }  # fmt: skip
        if scale.metrics_interval_s is not None:
            autoscaling |= {"metrics_interval_s": scale.metrics_interval_s,
                            "look_back_period_s": 4 * scale.metrics_interval_s}  # fmt: skip
        deployment["autoscaling_config"] = autoscaling
    else:
        deployment["num_replicas"] = scale.replicas
    return deployment


def build_application(options: ServeOptions, scale: ScaleOptions):
    """The bound Ray Serve application: ingress -> engine replicas, both -> stats hub."""
    from ray import serve

    from lmscale.serve.replicas import EngineReplica, Ingress, StatsHub

    no_cpu = {"num_cpus": 0}
    quiet = {"logging_config": {"enable_access_log": False, "log_level": "WARNING"}}
    hub = serve.deployment(
        StatsHub, name="stats", num_replicas=1, ray_actor_options=no_cpu, **quiet
    )
    engine = serve.deployment(EngineReplica, **engine_deployment_options(options, scale), **quiet)
    ingress = serve.deployment(
        Ingress, name="ingress", num_replicas=1, ray_actor_options=no_cpu, **quiet,
        max_ongoing_requests=100_000,  # streams only pass through; the engines set the limits
        graceful_shutdown_timeout_s=options.drain_s,
    )  # fmt: skip
    hub_app = hub.bind()
    threads = threads_per_replica(scale)
    return ingress.bind(
        engine.bind(options, threads, hub_app), hub_app, served_name(options), api_key(options)
    )


def start(options: ServeOptions, scale: ScaleOptions) -> str:
    """Start Ray if needed, then Serve on `options.host:port`, and deploy; returns the URL."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        if scale.ray_address:
            ray.init(address=scale.ray_address, logging_level="warning")
        else:
            ray.init(num_cpus=scale.num_cpus or os.cpu_count(), include_dashboard=False,
                     logging_level="warning")  # fmt: skip
    serve.start(http_options={"host": options.host, "port": options.port})
    serve.run(build_application(options, scale), name=APP_NAME, route_prefix="/")
    return f"http://{options.host}:{options.port}"


def stop(shutdown_ray: bool = True) -> None:
    import ray
    from ray import serve

    serve.shutdown()
    if shutdown_ray:
        ray.shutdown()


def serve_replicas(options: ServeOptions, scale: ScaleOptions) -> None:
    """Run until SIGTERM or Ctrl-C; then drain the replicas and stop what was started."""
    import ray

    own_ray = not scale.ray_address and not ray.is_initialized()
    url = start(options, scale)
    count = f"{scale.autoscale[0]}..{scale.autoscale[1]}" if scale.autoscale else scale.replicas
    print(
        f"serving {served_name(options)} on {url} (OpenAI API under /v1) with {count} "
        f"replica(s) x {threads_per_replica(scale)} thread(s) on Ray Serve, "
        f"{scale.routing} routing", flush=True,
    )  # fmt: skip
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    print("stopping: draining the replicas' streams", flush=True)
    if own_ray:
        stop(shutdown_ray=True)
    else:  # leave the user's cluster running, without our application
        from ray import serve

        serve.delete(APP_NAME)


def app_builder(args: dict[str, str]):
    """The application from the `args` of a Ray Serve config file, for `serve run`,
    `serve deploy` and KubeRay's RayService (see deploy/rayservice.yaml):

        import_path: lmscale.serve.scale_out:app_builder
        args: {model: smollm2-135m-instruct, autoscale: "1:4", threads_per_replica: "2"}

    Keys: model, served_model_name, api_key, dtype, eager, replicas, autoscale,
    target_ongoing_requests, upscale_delay_s, downscale_delay_s, threads_per_replica, routing.
    """
    from lmscale.engine.config import EngineConfig

    known = {
        "model", "served_model_name", "api_key", "dtype", "eager", "replicas", "autoscale",
        "target_ongoing_requests", "upscale_delay_s", "downscale_delay_s",
        "threads_per_replica", "routing",
    }  # fmt: skip
    if unknown := set(args) - known:
        raise LmscaleError(f"unknown lmscale args: {', '.join(sorted(unknown))}")
    eager = str(args.get("eager", "false")).lower() in ("1", "true", "yes")
    options = ServeOptions(
        model=args.get("model", "smollm2-135m-instruct"), dtype=args.get("dtype"),
        served_name=args.get("served_model_name"), api_key=args.get("api_key"),
        engine=EngineConfig(compiled_decode=not eager),
    )  # fmt: skip
    autoscale = args.get("autoscale")
    scale = ScaleOptions(
        replicas=int(args.get("replicas", 1)),
        autoscale=parse_autoscale(str(autoscale)) if autoscale else None,
        target_ongoing_requests=float(args.get("target_ongoing_requests", 8)),
        upscale_delay_s=float(args.get("upscale_delay_s", 5)),
        downscale_delay_s=float(args.get("downscale_delay_s", 30)),
        threads=int(args.get("threads_per_replica", 1)), routing=args.get("routing", "prefix"),
    )  # fmt: skip
    return build_application(options, scale)
