"""Start engine replicas on Ray Serve: ``tokenmill serve --replicas N``, ``serve run``, or from Python.

``tokenmill serve --replicas N`` starts Ray on this machine (loopback only, no dashboard, a small
object store), starts Ray Serve's HTTP proxy on --host/--port and deploys the application that
``build_application`` describes (server/replicas.py): N ``EngineReplica``s behind one
``TokenmillIngress``. With ``--ray-address`` it joins a running cluster instead, so replicas land on
every machine of it. ``app_builder`` is the same application for Ray's own CLI::

    serve run tokenmill.server.ray_serve:app_builder replicas=4 model=smollm2-135m-instruct

Ray is imported by the functions here, never at import time: without --replicas nothing imports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import threading
from typing import Any

from tokenmill.config import EngineConfig, ReplicaConfig

logger = logging.getLogger(__name__)

APP_NAME = "tokenmill"
OBJECT_STORE_BYTES = 100 * 1024 * 1024  # outputs are small and inlined; Ray's floor is 75 MiB
HEALTH_CHECK_PERIOD_S = 2.0  # a replica whose engine loop stopped is replaced within a few seconds
QUIET = {"enable_access_log": False}  # no log line per request (the server's metrics count them)
RAY_MISSING = "--replicas needs Ray Serve: pip install 'tokenmill[ray]'"


def import_ray(local: bool) -> Any:
    """``ray``, or ValueError with the install command. ``local``: Ray will start on this machine, on the
    loopback (Ray otherwise advertises the machine's network address, even for a one-machine cluster)."""
    if local:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when ray is first imported
    try:
        import ray
        from ray import serve  # noqa: F401 - the [serve] extra, not just ray
    except ImportError:
        raise ValueError(RAY_MISSING) from None
    return ray


def replica_threads(replicas: ReplicaConfig, config: EngineConfig) -> int:
    """Torch threads per replica: --threads-per-replica, else --threads, else the cores shared out."""
    return replicas.threads_per_replica or config.threads or max(1, (os.cpu_count() or 1) // replicas.num_replicas)


def build_application(config: EngineConfig, replicas: ReplicaConfig, app_options: dict[str, Any] | None = None
                      ) -> Any:
    """The Ray Serve application: ``replicas.num_replicas`` EngineReplicas behind a TokenmillIngress.

    app_options: create_app's keywords (api_key, max_queue, served_model_names ...). Each replica may hold
    max_num_seqs running plus max_queue waiting requests; Ray Serve holds the rest for the router.
    """
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from tokenmill.server.app import DEFAULT_MAX_QUEUE
    from tokenmill.server.replicas import EngineReplica, IngressOptions, PrefixRequestRouter, TokenmillIngress

    app_options = {"max_queue": DEFAULT_MAX_QUEUE, **(app_options or {})}
    threads = replica_threads(replicas, config)
    per_replica = config.max_num_seqs + app_options["max_queue"]
    engine = serve.deployment(EngineReplica, name="EngineReplica").options(
        num_replicas=replicas.num_replicas, ray_actor_options={"num_cpus": threads},
        max_ongoing_requests=per_replica, health_check_period_s=HEALTH_CHECK_PERIOD_S,
        graceful_shutdown_timeout_s=5.0, logging_config=QUIET,
        request_router_config=RequestRouterConfig(
            request_router_class=PrefixRequestRouter,
            request_router_kwargs={"routing": replicas.routing, "imbalance": replicas.imbalance}))
    ingress = serve.deployment(TokenmillIngress, name="TokenmillIngress").options(
        num_replicas=1, ray_actor_options={"num_cpus": 0}, logging_config=QUIET,
        max_ongoing_requests=replicas.num_replicas * per_replica + app_options["max_queue"] + 64)
    return ingress.bind(engine.bind(dataclasses.replace(config, threads=threads)),
                        IngressOptions(config.model, app_options))


def start_ray(replicas: ReplicaConfig, config: EngineConfig, log_to_driver: bool = True) -> Any:
    """Join the cluster at ``replicas.ray_address``, or start Ray here with CPUs for the replicas' threads."""
    ray = import_ray(local=replicas.ray_address is None)
    if ray.is_initialized():
        return ray
    if replicas.ray_address is not None:
        try:
            ray.init(address=replicas.ray_address, log_to_driver=log_to_driver)
        except ConnectionError as exc:
            raise ValueError(f"--ray-address {replicas.ray_address}: no Ray cluster answers there ({exc})") from None
        return ray
    ray.init(_node_ip_address="127.0.0.1", num_cpus=replicas.num_replicas * replica_threads(replicas, config),
             include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES, log_to_driver=log_to_driver)
    return ray


def deploy(config: EngineConfig, replicas: ReplicaConfig, app_options: dict[str, Any] | None = None,
           host: str = "127.0.0.1", port: int = 8000, log_to_driver: bool = True) -> None:
    """Start (or join) Ray, Serve's HTTP proxy on host:port and the application; returns once every
    replica has loaded its model. ``shutdown()`` undoes it."""
    start_ray(replicas, config, log_to_driver)
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    serve.run(build_application(config, replicas, app_options), name=APP_NAME, route_prefix="/")


def shutdown() -> None:
    """Delete the application, stop Serve and disconnect from Ray (stopping it if this process started it)."""
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


def run_replicated_server(configs: list[EngineConfig], replicas: ReplicaConfig, app_options: dict[str, Any],
                          host: str, port: int) -> int:
    """``tokenmill serve --replicas N``: serve until SIGINT/SIGTERM, then shut Ray down; returns 0."""
    if len(configs) != 1:
        raise ValueError(f"--replicas serves one model; got {len(configs)}")
    import_ray(local=replicas.ray_address is None)  # a missing Ray is a one-line error before anything starts
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"tokenmill: starting {replicas.num_replicas} replicas of {configs[0].model} on Ray Serve "
              f"(http://{host}:{port} answers once they have loaded)", flush=True)
        deploy(configs[0], replicas, app_options, host, port)
        print(f"tokenmill: serving {configs[0].model} with {replicas.num_replicas} replicas on "
              f"http://{host}:{port}", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def app_builder(args: dict[str, str]) -> Any:
    """For ``serve run tokenmill.server.ray_serve:app_builder key=value ...``: each key is a
    ``tokenmill serve`` flag without its dashes (``replicas=4 max_num_seqs=32 no_prefix_caching=true``)."""
    from tokenmill.cli import build_parser, engine_config_from_args, replica_config_from_args

    argv = ["serve"]
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value.lower() == "true":
            argv.append(flag)
        elif value.lower() != "false":
            argv += [flag, value]
    parsed = build_parser().parse_args(argv)
    replicas = replica_config_from_args(argparse.Namespace(**{**vars(parsed), "replicas": parsed.replicas or 1}))
    config = engine_config_from_args(parsed)
    api_key = parsed.api_key or os.environ.get("TOKENMILL_API_KEY") or None
    return build_application(config, replicas, {"api_key": api_key, "max_queue": parsed.max_queue,
                                                "served_model_names": parsed.served_model_names})
