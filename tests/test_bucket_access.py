"""A bucket this process cannot use (no credentials, no such bucket, access denied, an endpoint down) is
refused in ONE line naming the URL and the variables to set, before any work, by every command that takes
a URL; later failures of the storage libraries are one line too. Everything here talks to 127.0.0.1 only
(the moto server of `s3_server`, the GCS emulator of `gcs_server`); the gs:// credential checks make no
request at all, which `loopback_only` proves."""

from __future__ import annotations

import json
import socket
import time

import pytest

from sak.cli.cache import main as cache_main
from sak.cli.train import main as train_main
from sak.pipeline.base.errors import SakError
from sak.pipeline.buckets.access import check_access, write_probe
from sak.pipeline.buckets.bucket import Bucket
from sak.pipeline.buckets.failures import storage_error
from sak.pipeline.extraction.probe import bucket_node_probe, probe_bucket_nodes

AWS_CREDENTIAL_VARS = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
)  # fmt: skip


def _clear_filesystems() -> None:
    """fsspec keeps one filesystem per set of options, with the credentials it resolved at creation."""
    import gcsfs
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    gcsfs.GCSFileSystem.clear_instance_cache()


@pytest.fixture(autouse=True)
def fresh_filesystems():
    _clear_filesystems()
    yield
    _clear_filesystems()


@pytest.fixture
def loopback_only(monkeypatch):
    """Any name lookup or connection to anything but 127.0.0.1 fails the test (recorded, then refused)."""
    attempts: list[str] = []
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *args, **kw):
        if host not in ("127.0.0.1", "localhost", None):
            attempts.append(str(host))
            raise socket.gaierror(f"test: no lookup of {host}")
        return real_getaddrinfo(host, *args, **kw)

    def connect(self, address):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "localhost"):
            attempts.append(str(address))
            raise OSError(f"test: no connection to {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


@pytest.fixture
def no_aws_credentials(monkeypatch, tmp_path):
    """The moto endpoint stays (AWS_ENDPOINT_URL); every source of AWS credentials is gone."""
    for name in AWS_CREDENTIAL_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))


@pytest.fixture
def no_gcs_credentials(monkeypatch, tmp_path):
    """Real GCS (no emulator) and no Google credentials anywhere; NO_GCE_CHECK (conftest) keeps google-auth
    off the metadata server."""
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))  # no application-default file either


def _one_error_line(capsys, *needles: str) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = [line for line in captured.err.splitlines() if line.strip()]
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1, captured.err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("command", ["inspect", "verify", "ls", "show"])
def test_cache_commands_without_aws_credentials_say_one_line(command, s3_server, no_aws_credentials, capsys):
    url = s3_server("sak-access") + "/team/c"
    argv = [command, url] + (["--view", "0"] if command == "show" else [])
    assert cache_main(argv) == 2
    _one_error_line(
        capsys, url, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_ENDPOINT_URL"
    )


def test_run_without_credentials_refuses_before_ingest_and_ray(
    s3_server, no_aws_credentials, photo_dir, monkeypatch, capsys
):
    import sak.pipeline.extraction.driver as driver

    def started(*_a, **_kw):
        raise AssertionError("work started before the bucket was checked")

    monkeypatch.setattr(driver, "ray_session", started)
    monkeypatch.setattr(driver, "ingest", started)
    url = s3_server("sak-access") + "/team/run"
    argv = ["run", "--source", str(photo_dir), "--out", url, "--teachers", "dinov2_tiny", "--size", "64"]
    assert cache_main(argv) == 2
    _one_error_line(capsys, url, "AWS_ACCESS_KEY_ID")


def test_stage1_from_a_bucket_without_credentials_says_one_line(
    s3_server, no_aws_credentials, tmp_path, capsys
):
    url = s3_server("sak-access") + "/team/c"
    argv = ["stage1", "--cache", url, "--student", "tiny", "--steps", "1", "--out", str(tmp_path / "r")]
    assert train_main(argv) == 2
    _one_error_line(capsys, url, "AWS_ACCESS_KEY_ID")


@pytest.mark.parametrize(
    "main, argv",
    [
        (
            cache_main,
            ["stage2", "--init", "runs/none", "--dataset", "pascal", "--data-root", ".", "--out", "{url}"],
        ),
        (
            train_main,
            ["stage2", "--cache", "{url}", "--dataset", "pascal", "--data-root", ".", "--init", "runs/none"],
        ),
        (train_main, ["tiger", "--cache", "{url}", "--dataset", "pascal", "--data-root", "."]),
    ],
    ids=["sak-cache stage2", "sak-train stage2", "sak-train tiger"],
)
def test_stage2_commands_check_the_bucket_first(main, argv, s3_server, no_aws_credentials, tmp_path, capsys):
    url = s3_server("sak-access") + "/team/s2"
    extra = [] if "--out" in argv else ["--out", str(tmp_path / "run")]
    assert main([a.format(url=url) for a in argv] + extra) == 2
    _one_error_line(capsys, url, "AWS_ACCESS_KEY_ID")


def test_a_missing_bucket_is_named(s3_server, capsys):
    s3_server("sak-access")  # the server runs; this bucket does not exist on it
    assert cache_main(["inspect", "s3://sak-no-such-bucket/team/c"]) == 2
    _one_error_line(capsys, "bucket sak-no-such-bucket", "does not exist")
    with pytest.raises(SakError, match="bucket sak-no-such-bucket .* does not exist"):
        check_access("s3://sak-no-such-bucket/team/c", write=True)


def test_an_empty_prefix_of_a_bucket_is_fine_to_write(s3_server):
    url = s3_server("sak-access") + "/team/new"
    check_access(url, write=True)
    assert Bucket(url).listing() == {}  # the write probe left nothing behind


def _iam_user(name: str, actions: list[str], monkeypatch) -> None:
    """An IAM user of the moto server allowed these S3 actions; the test process takes its key."""
    import boto3

    iam = boto3.client("iam")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
    try:
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName="s3", PolicyDocument=json.dumps(policy))
    except iam.exceptions.EntityAlreadyExistsException:
        pass
    key = iam.create_access_key(UserName=name)["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])


@pytest.fixture
def iam_reader(s3_server, monkeypatch):
    """moto with IAM authentication on (403s for real): this process holds the key of a user allowed to
    list and read, not to write. Yields the bucket's URL."""
    from moto.core.authorization import enable_iam_authentication

    url = s3_server("sak-access")
    _iam_user("sak-reader", ["s3:ListBucket", "s3:GetObject"], monkeypatch)
    with enable_iam_authentication():
        yield url


@pytest.fixture
def iam_driver_only(s3_server, monkeypatch):
    """moto with IAM authentication on: this process (the driver) holds a writer's key, while the Ray
    workers keep the key they started with, unknown to moto's IAM: a node without the driver's
    credentials. Yields the bucket's URL."""
    from moto.core.authorization import enable_iam_authentication

    url = s3_server("sak-access")
    _iam_user("sak-writer", ["s3:*"], monkeypatch)
    with enable_iam_authentication():
        yield url


def test_denied_access_is_one_line(iam_reader, monkeypatch, capsys):
    check_access(iam_reader + "/team/c")  # allowed to list
    with pytest.raises(
        SakError, match=r"access to s3://sak-access/team/c denied while writing .*AWS_ACCESS_KEY_ID"
    ):
        check_access(iam_reader + "/team/c", write=True)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-NOT-KNOWN-HERE")  # moto answers 403 InvalidAccessKeyId
    _clear_filesystems()
    assert cache_main(["ls", iam_reader + "/team"]) == 2
    _one_error_line(capsys, "s3://sak-access/team", "denied", "AWS_SECRET_ACCESS_KEY")


def test_later_bucket_calls_fail_in_one_line_too(s3_server, no_aws_credentials):
    bucket = Bucket(s3_server("sak-access") + "/team/c")
    with pytest.raises(SakError, match="no usable credentials .*listing.*AWS_ACCESS_KEY_ID"):
        bucket.listing()
    with pytest.raises(SakError, match="no usable credentials .*reading cache.json"):
        bucket.read_bytes("cache.json")
    assert write_probe(bucket.url, "node-x").startswith("no usable credentials for s3://sak-access/team/c")


def test_the_node_probe_writes_reads_and_deletes_with_the_nodes_own_credentials(s3_server, monkeypatch):
    url = s3_server("sak-access") + "/team/nodes"
    assert bucket_node_probe(url, "0123456789ab") is None
    assert Bucket(url).listing() == {}  # nothing left behind
    for name in AWS_CREDENTIAL_VARS:  # this node's environment lacks the credentials
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    _clear_filesystems()
    problem = bucket_node_probe(url, "0123456789ab")
    assert problem.startswith(f"no usable credentials for {url}") and "AWS_ACCESS_KEY_ID" in problem


def test_a_ray_node_without_the_drivers_credentials_is_named(iam_driver_only, ray_local):
    import ray

    url = iam_driver_only + "/team/nodes"
    check_access(url, write=True)  # the driver may write
    node = ray.nodes()[0]
    with pytest.raises(SakError) as info:
        probe_bucket_nodes(url)  # each alive node (one here) runs bucket_node_probe with its own environment
    message = str(info.value)
    assert f"node {node['NodeID'][:12]} ({node['NodeManagerAddress']}) cannot write {url}" in message
    assert "denied" in message and "every node needs the driver's bucket credentials" in message


def test_run_into_a_bucket_some_node_cannot_write_stops_before_the_ingest(
    iam_driver_only, ray_local, photo_dir, monkeypatch, tmp_path, capsys
):
    import sak.pipeline.extraction.driver as driver
    from sak.pipeline.buckets.mirror import STAGE_ENV

    def ingest(*_a, **_kw):
        raise AssertionError("ingest started before every node was checked")

    monkeypatch.setattr(driver, "ingest", ingest)
    monkeypatch.setenv(STAGE_ENV, str(tmp_path / "stage"))
    url = iam_driver_only + "/team/run-nodes"
    argv = ["run", "--source", str(photo_dir), "--out", url, "--teachers", "dinov2_tiny", "--size", "64"]
    assert cache_main(argv) == 2
    _one_error_line(capsys, "cannot write " + url, "every node needs the driver's bucket credentials")
    assert Bucket(url).listing() == {}  # no lock, no probe object left


def test_gs_without_credentials_fails_at_once_without_any_request(
    no_gcs_credentials, loopback_only, tmp_path, monkeypatch, capsys
):
    t0 = time.monotonic()
    assert cache_main(["inspect", "gs://sak-gs-real/team/c"]) == 2
    _one_error_line(
        capsys, "gs://sak-gs-real/team/c", "GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST"
    )
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing-key.json"))
    assert (
        train_main(
            ["stage1", "--cache", "gs://sak-gs-real/c", "--student", "tiny", "--out", str(tmp_path / "r")]
        )
        == 2
    )
    _one_error_line(capsys, "missing-key.json", "GOOGLE_APPLICATION_CREDENTIALS")
    assert time.monotonic() - t0 < 5  # gcsfs alone: about a minute of fallbacks and retries
    assert loopback_only == []  # neither googleapis.com nor the metadata server was asked


def test_gs_missing_bucket_on_the_emulator(gcs_server, capsys):
    assert cache_main(["verify", "gs://sak-gs-missing/team/c"]) == 2
    _one_error_line(capsys, "bucket sak-gs-missing", "does not exist")
    check_access(f"{gcs_server}/team/new", write=True)  # the emulator's bucket: fine


def _closed_port() -> int:
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gs_emulator_down_fails_fast(monkeypatch, capsys):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{_closed_port()}")
    t0 = time.monotonic()
    assert cache_main(["ls", "gs://sak-gs/team"]) == 2
    _one_error_line(capsys, "cannot reach the GCS emulator", "STORAGE_EMULATOR_HOST")
    assert time.monotonic() - t0 < 6  # gcsfs alone retries a refused connection for about 30 s


def test_s3_endpoint_down_fails_fast(monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    t0 = time.monotonic()
    assert cache_main(["inspect", "s3://sak-access/team/c"]) == 2
    _one_error_line(capsys, "cannot reach the S3 endpoint", "AWS_ENDPOINT_URL")
    assert time.monotonic() - t0 < 6  # s3fs and botocore alone retry for about 13 s


class _ClientError(Exception):  # the shape of botocore's ClientError
    def __init__(self, code: str) -> None:
        super().__init__(f"An error occurred ({code})")
        self.response = {"Error": {"Code": code}}


class HttpError(Exception):  # the shape of gcsfs's HttpError
    def __init__(self, code: int) -> None:
        super().__init__(f"error, {code}")
        self.code = code


class NoCredentialsError(Exception):
    pass


@pytest.mark.parametrize(
    "error, words",
    [
        (NoCredentialsError("Unable to locate credentials"), "no usable credentials"),
        (HttpError(401), "no usable credentials"),
        (PermissionError("Access Denied"), "denied"),
        (_ClientError("AccessDenied"), "denied"),
        (HttpError(403), "denied"),
        (OSError("Forbidden: b/sak/o\nno storage.objects.list"), "denied"),
        (ConnectionRefusedError(111, "refused"), "cannot reach"),
    ],
)
def test_storage_library_errors_map_to_one_line(error, words):
    wrapped = OSError("s3fs says")  # found through the cause chain too
    wrapped.__cause__ = error
    for e in (error, wrapped):
        message = str(storage_error("s3://b/p", e, "reading x"))
        assert words in message and "s3://b/p" in message and "\n" not in message


def test_other_errors_are_not_storage_errors():
    assert storage_error("s3://b/p", FileNotFoundError("b/p/x"), "reading") is None
    assert storage_error("s3://b/p", ValueError("a bug"), "reading") is None
    local = PermissionError(13, "Permission denied", "/home/u/.cache/sak/x")
    assert storage_error("s3://b/p", local, "downloading x") is None  # the local disk, not the store
