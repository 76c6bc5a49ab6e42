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
