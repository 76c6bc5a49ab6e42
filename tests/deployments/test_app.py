"""The Serve wiring (deployments/app.py): what the deployments are built with."""

from pipeline.config import load_config


def test_no_secret_travels_in_a_replicas_arguments(tiny_llava):
    """The Serve app's deployments get the config without its secrets and the ingress the API
    key's digest: Ray shows replica init arguments in its dashboard."""
    import ray.cloudpickle as cloudpickle

    from deployments.app import build

    secrets = ("AKIA-not-for-replicas", "s3cret-not-for-replicas", "api-key-not-for-replicas")
    cfg = load_config({"model": {"name": tiny_llava}, "storage": {"key": secrets[0], "secret": secrets[1]},
                       "serve": {"api_key": secrets[2]}})
    ingress = build(cfg)._bound_deployment
    model = ingress.init_args[1]._bound_deployment
    for bound in (ingress, model):
        sent = cloudpickle.dumps((bound.init_args, bound.init_kwargs)) + repr((bound.init_args, bound.init_kwargs)).encode()
        assert not [s for s in secrets if s.encode() in sent]
    from deployments.serving import key_digest

    assert ingress.init_args[2] == key_digest(secrets[2])


def _deployments(cfg):
    from deployments.app import build

    ingress = build(cfg)._bound_deployment
    return ingress, ingress.init_args[1]._bound_deployment


def test_the_serve_section_is_what_serve_deploys(tiny_llava):
    """Replicas, autoscaling, max_ongoing_requests, max_queued_requests and CPUs reach Serve's
    deployments as the README's `serve` table says."""
    cfg = load_config({"model": {"name": tiny_llava}, "resources": {"model_cpus": 0.75},
                       "serve": {"num_replicas": None, "autoscaling": {"min_replicas": 2, "max_replicas": 5, "target_ongoing_requests": 3},
                                 "ingress_replicas": 2, "ingress_cpus": 0.25, "max_ongoing_requests": 7, "max_queued_requests": 11,
                                 "graceful_shutdown_timeout_s": 12}})
    ingress, model = _deployments(cfg)
    auto = model._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (2, 5, 3)
    assert (model.max_ongoing_requests, model.max_queued_requests) == (7, 7 * 5 + 11)  # the ingress's own bound
    assert model.ray_actor_options["num_cpus"] == 0.75 and model._deployment_config.graceful_shutdown_timeout_s == 12
    assert (ingress.num_replicas, ingress.ray_actor_options["num_cpus"]) == (2, 0.25)
    assert ingress.max_ongoing_requests == 2 * (7 * 5 + 11)  # /health and /v1/models pass beside a full chat bound

    fixed = load_config({"model": {"name": tiny_llava}, "serve": {"num_replicas": 3, "max_queued_requests": -1}})
    ingress, model = _deployments(fixed)
    assert (model.num_replicas, model._deployment_config.autoscaling_config) == (3, None)
    assert model.max_queued_requests == -1  # -1: no bound
    assert ingress.max_ongoing_requests == 2 * 2 * 32 * 3  # unbounded: what the replicas hold and queue, twice
