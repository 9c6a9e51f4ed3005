"""botocore exceptions turned into one-line ConfigError/BackupError messages.

The SDK's exceptions never carry credentials, and neither do these messages: they name
the endpoint (without user-info), the bucket and the action that failed. The full trace
is logged at debug level only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from rollback_cli.errors import BackupError, ConfigError, RollbackError
from rollback_cli.log import get_logger


@contextlib.contextmanager
def s3_errors(action: str, *, endpoint: str, bucket: str) -> Iterator[None]:
    """Turn SDK exceptions raised inside the block into one-line errors.

    ``action`` names what was being done ("upload", "listing", ...), ``endpoint`` is the
    endpoint URL to show (already without credentials), ``bucket`` the bucket's name.
    """
    from botocore import exceptions as bex

    try:
        try:
            yield
        except (bex.BotoCoreError, bex.ClientError):
            # Users see the one-line error below; the trace is for --log-level debug.
            get_logger().debug("s3 request failed", action=action, exc_info=True)
            raise
    except bex.ClientError as exc:
        raise _client_error(exc, action, endpoint, bucket) from exc
    except bex.BotoCoreError as exc:
        raise _sdk_error(exc, action, endpoint) from exc


def is_connection_error(exc: BaseException) -> bool:
    """Whether ``exc`` means the server could not be reached (so cleaning up is futile)."""
    from botocore import exceptions as bex

    return isinstance(exc, bex.ConnectionError | bex.HTTPClientError)


def _client_error(exc: Any, action: str, endpoint: str, bucket: str) -> RollbackError:
    """The error for an answer from S3 (a ``botocore.exceptions.ClientError``)."""
    where = f"(endpoint {endpoint})"
    error = exc.response.get("Error", {})
    code = str(error.get("Code", "")) or "unknown"
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    message = " ".join(str(error.get("Message", "")).split())
    if code == "NoSuchBucket":
        return ConfigError(f"S3 bucket '{bucket}' does not exist {where}")
    if code == "InvalidAccessKeyId":
        return ConfigError(
            f"S3 does not recognise the access key id {where}",
            hint="check AWS_ACCESS_KEY_ID or AWS_PROFILE",
        )
    if code == "SignatureDoesNotMatch":
        return ConfigError(
            f"S3 rejected the request signature {where}",
            hint="the secret access key does not match the access key id",
        )
    if code in ("AccessDenied", "AllAccessDisabled", "AccountProblem", "403"):
        return ConfigError(
            f"access denied to S3 bucket '{bucket}' during {action} {where}",
            hint="check the credentials and their permissions on the bucket",
        )
    if code in ("PermanentRedirect", "AuthorizationHeaderMalformed"):
        return ConfigError(
            f"S3 bucket '{bucket}' is in another region {where}",
            hint="set --s3-region or AWS_REGION",
        )
    if code == "PreconditionFailed":
        return BackupError(f"an object changed while it was read during {action}")
    if code == "InvalidBucketName":
        return ConfigError(f"'{bucket}' is not a valid S3 bucket name")
    detail = f"{code}: {message}" if message else f"{code} (HTTP {status})"
    return ConfigError(f"S3 {action} failed {where}: {detail}")


def _sdk_error(exc: Exception, action: str, endpoint: str) -> RollbackError:
    """The error for a failure on the client side (a ``BotoCoreError``)."""
    from botocore import exceptions as bex

    if isinstance(exc, bex.NoCredentialsError | bex.PartialCredentialsError):
        return ConfigError(
            "no usable AWS credentials found",
            hint="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE",
        )
    if isinstance(exc, bex.EndpointConnectionError | bex.ConnectTimeoutError):
        return ConfigError(f"cannot connect to the S3 endpoint {endpoint}")
    if isinstance(
        exc,
        bex.ReadTimeoutError
        | bex.ConnectionClosedError
        | bex.ResponseStreamingError
        | bex.IncompleteReadError
        | bex.ConnectionError,
    ):
        return ConfigError(f"lost the connection to the S3 endpoint {endpoint} during {action}")
    if isinstance(exc, bex.FlexibleChecksumError):
        return BackupError(f"S3 returned data that fails its own checksum during {action}")
    return ConfigError(f"S3 {action} failed (endpoint {endpoint}): {exc}")
