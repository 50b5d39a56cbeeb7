"""What a storage library's failure means, in one line naming the URL and the variables to set
(`storage_errors`, around each `Bucket` call and in `check_access`, access.py), and gs:// credentials
resolved before gcsfs is used (`gcs_credentials`).

The exceptions are recognised by class name (walking the `__cause__` chain), so that neither botocore nor
google-auth has to be installed for the other store's URLs:

    no credentials   botocore NoCredentialsError / PartialCredentialsError / ProfileNotFound,
                     google-auth DefaultCredentialsError / RefreshError, gcsfs HttpError 401
    denied (403)     PermissionError (s3fs: AccessDenied, InvalidAccessKeyId, SignatureDoesNotMatch),
                     gcsfs OSError "Forbidden", ClientError / HttpError with code 403
    unreachable      botocore EndpointConnectionError / ConnectTimeoutError, aiohttp ClientConnectorError,
                     ConnectionError, fsspec FSTimeoutError
    missing bucket   FileNotFoundError from the bucket's own metadata (`check_access`)

gs:// without credentials: gcsfs would try google-auth's default chain, then the GCE metadata server, then
fall back to anonymous requests that it retries for about a minute (six tries with exponential backoff on
connection errors and on 401 "Invalid Credentials"), logging a traceback when it gives up. `gcs_credentials`
resolves the credentials once, before gcsfs is created, and refreshes them once, so that a missing key
file, no credentials at all, or a revoked key fail in one line: the first two with no request at all under
NO_GCE_CHECK=true (else after google-auth's own metadata-server check: 3 tries of at most 3 s). With
STORAGE_EMULATOR_HOST, gcsfs talks anonymously to the emulator, which one bounded request checks (access.py).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from sak.pipeline.base.errors import SakError, one_line

S3_FIX = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and AWS_ENDPOINT_URL for a non-AWS endpoint"
GCS_FIX = "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file (or STORAGE_EMULATOR_HOST for an emulator)"
GCS_SCOPE = "https://www.googleapis.com/auth/devstorage.full_control"  # what gcsfs asks for by default

_CREDENTIALS = {
    "NoCredentialsError",
    "PartialCredentialsError",
    "ProfileNotFound",
    "DefaultCredentialsError",
    "RefreshError",
    "NoRegionError",
}
_UNREACHABLE = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ClientConnectorError",
    "ClientConnectionError",
    "ServerTimeoutError",
    "FSTimeoutError",
    "ConnectionError",
    "TimeoutError",
}
_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "403"}


def is_gcs(url: str) -> bool:
    return url.startswith(("gs://", "gcs://"))


def credentials_fix(url: str) -> str:
    return GCS_FIX if is_gcs(url) else S3_FIX


def emulator_host() -> str | None:
    """The GCS emulator gcsfs talks to instead of Google (STORAGE_EMULATOR_HOST), if any."""
    host = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if host in ("", "default"):
        return None
    return host if host.startswith(("http://", "https://")) else f"http://{host}"


def failure_kind(e: BaseException) -> str | None:
    """What a storage library's exception means: credentials, denied, unreachable, or None (not ours)."""
    seen = 0
    while e is not None and seen < 8:
        names = {c.__name__ for c in type(e).__mro__}
        code = str(getattr(e, "code", "") or "")
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", code))
        if names & _CREDENTIALS or ("HttpError" in names and code == "401"):
            return "credentials"
        local = getattr(e, "filename", None) is not None  # a local file's PermissionError is not the store's
        if (
            (isinstance(e, PermissionError) and not local)
            or code in _DENIED_CODES
            or str(e).startswith("Forbidden")
        ):
            return "denied"
        if names & _UNREACHABLE:
            return "unreachable"
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def storage_error(url: str, e: BaseException, doing: str) -> SakError | None:
    """The one-line error for a storage library's failure while `doing` something with url, or None when
    e is not one (a missing object, which callers handle, or a bug, which should surface as it is)."""
    kind = failure_kind(e)
    if kind == "credentials":
        return SakError(
            f"no usable credentials for {url} while {doing} ({one_line(e, 160)}); {credentials_fix(url)}"
        )
    if kind == "denied":
        return SakError(
            f"access to {url} denied while {doing} ({one_line(e, 160)}); the credentials found may not do that: "
            f"{credentials_fix(url)} of an identity allowed to read and write it"
        )
    if kind == "unreachable":
        where = "STORAGE_EMULATOR_HOST or the network" if is_gcs(url) else "AWS_ENDPOINT_URL or the network"
        return SakError(
            f"cannot reach the object store of {url} while {doing} ({one_line(e, 160)}); check {where}"
        )
    return None


@contextmanager
def storage_errors(url: str, doing: str) -> Iterator[None]:
    """Turn a storage library's failure inside the block into one SakError line (others pass unchanged)."""
    try:
        yield
    except SakError:
        raise
    except Exception as e:
        error = storage_error(url, e, doing)
        if error is None:
            raise
        raise error from e


@functools.lru_cache(maxsize=8)
def _gcs_credentials_problem(env: tuple[str | None, ...]) -> str | None:
    import google.auth
    import google.auth.exceptions
    from google.auth.transport.requests import Request

    try:
        credentials, _ = google.auth.default(scopes=[GCS_SCOPE])
        if not credentials.valid:  # one token request now, where gcsfs would retry a refused one for a minute
            credentials.refresh(Request())
    except google.auth.exceptions.GoogleAuthError as e:
        return one_line(e, 160)
    return None


def gcs_credentials(url: str) -> None:
    """gs:// outside an emulator: Google credentials must resolve (GOOGLE_APPLICATION_CREDENTIALS, gcloud's
    application-default file, or a GCE/GKE service account), checked once per process and environment."""
    quiet_gcsfs()
    if emulator_host():
        return
    env = ("GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG", "NO_GCE_CHECK", "GCE_METADATA_HOST")
    problem = _gcs_credentials_problem(tuple(os.environ.get(k) for k in env))
    if problem:
        raise SakError(f"no usable credentials for {url} ({problem}); {GCS_FIX}")


def quiet_gcsfs() -> None:
    """gcsfs logs each failed request's traceback (logger.exception) and then raises it; the error is
    reported once, in one line, so its own log stays out of the user's terminal unless asked for."""
    logger = logging.getLogger("gcsfs")
    if logger.level == logging.NOTSET and not os.environ.get("GCSFS_DEBUG"):
        logger.setLevel(logging.CRITICAL)
