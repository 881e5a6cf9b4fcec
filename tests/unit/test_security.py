"""Credentials never leave the operator's control, the parts that need no cluster: the
Ray address allow-list and a job's environment. tests/test_security.py checks the rest
on the real stack."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lethe.store import S3Settings, Store
from lethe_operator.context import (
    RAY_ADDRESSES_ENV,
    ModelContext,
    ModelRefused,
    canonical_address,
    check_ray_address,
)
from lethe_operator.raylaunch import RayJobs
from lethe_operator.spec import ModelSpec

from .test_spec import spec_schema, with_defaults


def test_ray_addresses_are_compared_by_scheme_host_port_and_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(RAY_ADDRESSES_ENV, "http://10.0.0.7:8265/, https://ray.example.com/jobs")
    # the allow-list's own spelling is what requests go to
    assert check_ray_address("http://10.0.0.7:8265") == "http://10.0.0.7:8265"
    assert check_ray_address("HTTP://10.0.0.7:8265///") == "http://10.0.0.7:8265"
    assert check_ray_address("https://RAY.example.com:443/jobs/") == "https://ray.example.com/jobs"
    for address in (
        "https://10.0.0.7:8265",  # another scheme
        "http://10.0.0.7:8266",  # another port
        "http://10.0.0.7",  # port 80
        "http://localhost:8265",  # another spelling of a host is another host
        "http://10.0.0.7:8265/other",  # another path
        "https://ray.example.com",
        "http://10.0.0.7:8265@evil.example.com:8265",  # user info: evil is the host
        "http://evil.example.com/?http://10.0.0.7:8265",
        "http://10.0.0.7:8265#x",
        "ray://10.0.0.7:10001",
        "",
    ):
        with pytest.raises(ModelRefused) as e:
            check_ray_address(address)
        assert e.value.reason == "RayAddressNotAllowed", address
    assert canonical_address("http://h:8265/") == canonical_address("http://H:8265")
    monkeypatch.setenv(RAY_ADDRESSES_ENV, "")
    with pytest.raises(ModelRefused):  # nothing allowed unless the admin lists it
        check_ray_address("http://10.0.0.7:8265")


def test_a_jobs_runtime_env_holds_where_the_data_is_never_the_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lethe.layout import ModelLayout

    monkeypatch.setenv(RAY_ADDRESSES_ENV, "http://10.0.0.7:8265")
    settings = S3Settings("http://s3.local:8333", "bkt", "AKIA-TENANT", "tenant-secret")
    spec = {
        "ray": {
            "address": "http://10.0.0.7:8265/",
            # a tenant's own variables travel, but never one named for a key
            "env": {"OMP_NUM_THREADS": "1", "AWS_SECRET_ACCESS_KEY": "tenant-secret"},
        },
        "storage": {"bucket": "bkt"},
    }
    parsed = ModelSpec.parse(with_defaults(spec, spec_schema()))
    ctx = ModelContext("ns", "m", "uid", parsed, Store(settings), ModelLayout.of("ns.m"))
    jobs = ctx.ray()
    assert isinstance(jobs, RayJobs) and jobs.address == "http://10.0.0.7:8265"
    assert jobs.env == {
        "OMP_NUM_THREADS": "1",
        "LETHE_BUCKET": "bkt",
        "LETHE_S3_ENDPOINT": "http://s3.local:8333",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    # whatever a caller passes, RayJobs drops the key variables
    assert RayJobs("http://x", {"AWS_ACCESS_KEY_ID": "a", "LETHE_BUCKET": "b"}).env == {
        "LETHE_BUCKET": "b"
    }
    spec["ray"]["address"] = "http://10.0.0.8:8265"  # a spec edited since, read again
    edited = replace(ctx, spec=ModelSpec.parse(with_defaults(spec, spec_schema())))
    with pytest.raises(ModelRefused):  # the address is checked again when it is used
        edited.ray()
