"""Objects in an S3 bucket (AWS, or any S3-compatible server: SeaweedFS, Ceph RGW, MinIO).

The key ``k`` is the S3 object ``prefix + k`` in ``bucket``.  The contract of
:class:`~backend.storage.objects.base.ObjectStore` maps onto S3 as follows:

* ``put`` is one PutObject: S3 replaces an object whole, never partly, so a reader sees the
  old object or the new one.  S3 is read-after-write consistent (AWS since December 2020;
  SeaweedFS and RGW always were): a ``get`` after a ``put`` returned sees the new object.
* ``sync`` does nothing: S3 acknowledges a PutObject or DeleteObject only once the server
  has stored it by its own durability rules (on AWS, redundantly across zones), and there is
  nothing like a write cache to flush afterwards.  The volume is as durable as the server
  makes an acknowledged object.
* No offset writes: a partial write is a read-modify-write of the whole object, done by
  ChunkedStorage under its chunk lock.

Transient failures (HTTP 5xx, SlowDown and other throttling, connection refused or reset,
timeouts) are retried here, per object, with exponential backoff and jitter, within
``attempts`` tries and ``deadline`` seconds; botocore's own retries are turned off so that
this loop is the only one.  The deadline is checked before each retry: an attempt already
sent is bounded by ``connect_timeout`` and ``read_timeout``.

One botocore client, created in ``__init__``, serves every thread (clients are thread safe;
sessions are not, and are used only there).
"""

from __future__ import annotations

import builtins
import errno
import functools
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import boto3
import botocore.config
import botocore.exceptions

from backend.storage.base import StorageError
from backend.storage.objects.base import ObjectStore
from backend.storage.objects.directory import check_key

log = logging.getLogger(__name__)

T = TypeVar("T")

_PREFIX = re.compile(r"[A-Za-z0-9._/-]*")

# S3 error codes (the <Code> of the error document) by the errno they mean.
_REFUSED = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "ExpiredToken",
        "InvalidAccessKeyId",
        "InvalidToken",
        "SignatureDoesNotMatch",
    }
)
_FULL = frozenset({"EntityTooLarge", "QuotaExceeded", "InsufficientStorage"})
_THROTTLED = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequests",
        "TooManyRequestsException",
        "RequestTimeout",
        "ServiceUnavailable",
        "InternalError",
    }
)
_NO_KEY = frozenset({"NoSuchKey", "404", "NotFound"})
_HTTP_INSUFFICIENT_STORAGE = 507
_HTTP_TOO_MANY_REQUESTS = 429

#: Errnos that a retry may cure; the rest are raised at once.
TRANSIENT = frozenset({errno.EIO, errno.ETIMEDOUT, errno.ECONNRESET, errno.EAGAIN})


class S3ObjectStore(ObjectStore):
    """The objects under ``prefix`` in ``bucket``, through one boto3 client.

    * ``endpoint``: the endpoint URL (``http://127.0.0.1:8333``); ``None`` is AWS.
    * ``region``, ``access_key``, ``secret_key``, ``session_token``: ``None`` leaves each to
      boto3's usual chain (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
      ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``, ``~/.aws``, instance roles...).
      ``access_key`` and ``secret_key`` are given both or neither (else ``ValueError``).
    * ``connect_timeout``, ``read_timeout``: seconds, per HTTP attempt.
    * ``attempts``, ``deadline``, ``backoff``, ``max_backoff``: a transient failure is tried
      again after ``backoff`` seconds, doubling up to ``max_backoff`` (with jitter), at most
      ``attempts`` tries in all and no new try once ``deadline`` seconds have passed since
      the first.  After that it raises ``EIO`` (server errors, throttling), ``ETIMEDOUT``
      (timeouts) or ``ECONNRESET`` (connection refused, reset or cut short).
    * ``max_connections``: the HTTP connection pool; at least the number of threads using
      the store, or they queue for a connection.
    * ``page_size``: keys asked per ListObjectsV2 request (S3 returns at most 1000).
    * ``create_bucket``: create the bucket if it does not exist (else a missing bucket is
      ``ENOENT`` on first use).

    Errors: ``EACCES`` when the credentials are refused (AccessDenied, InvalidAccessKeyId,
    SignatureDoesNotMatch...), ``ENOENT`` when the bucket does not exist, ``ENOSPC`` for
    EntityTooLarge, QuotaExceeded and InsufficientStorage (HTTP 507), ``EINVAL`` for a key
    outside the contract, ``EBADF`` once closed.  Messages name the bucket, the key and the
    S3 error code.  The constructor raises ``ValueError`` for bad arguments and
    ``StorageError(EINVAL)`` for an endpoint or region that boto3 refuses.
    """

    supports_offset_writes = False

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        session_token: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        attempts: int = 5,
        deadline: float = 60.0,
        backoff: float = 0.1,
        max_backoff: float = 5.0,
        max_connections: int = 32,
        page_size: int = 1000,
        create_bucket: bool = False,
    ) -> None:
        if not bucket:
            raise ValueError("bucket must not be empty")
        if not _PREFIX.fullmatch(prefix):
            raise ValueError(f"prefix {prefix!r} has characters outside [A-Za-z0-9._/-]")
        if (access_key is None) != (secret_key is None):
            raise ValueError("access_key and secret_key are given both or neither")
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, not {attempts}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, not {max_connections}")
        if not 1 <= page_size <= 1000:
            raise ValueError(f"page_size must be in [1, 1000], not {page_size}")
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint = endpoint
        self._attempts = attempts
        self._deadline = deadline
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._page_size = page_size
        self._closed = False
        self._close_lock = threading.Lock()
        config = botocore.config.Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max_connections,
            # This class retries, bounded by a deadline; botocore must not retry underneath.
            retries={"total_max_attempts": 1, "mode": "standard"},
        )
        try:
            session = boto3.session.Session(
                aws_access_key_id=access_key,
                aws_secret_access_key=secret_key,
                aws_session_token=session_token,
                region_name=region,
            )
            self._client: Any = session.client("s3", endpoint_url=endpoint, config=config)
        except (botocore.exceptions.BotoCoreError, ValueError) as err:
            # A malformed endpoint or region, an unreadable ~/.aws/config...
            raise StorageError(errno.EINVAL, f"cannot set up S3 for {bucket}: {err}") from err
        if create_bucket:
            try:
                self._create_bucket(region)
            except BaseException:
                self.close()
                raise

    # -- ObjectStore -------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        name = self._name(key)

        def get() -> bytes | None:
            try:
                response = self._client.get_object(Bucket=self.bucket, Key=name)
            except botocore.exceptions.ClientError as err:
                if _code(err) in _NO_KEY:
                    return None
                raise
            return bytes(response["Body"].read())

        return self._call("get", name, get)

    def get_range(self, key: str, offset: int, length: int) -> bytes | None:
        name = self._name(key)
        if length <= 0:
            # No Range header can ask for nothing; only existence is left to tell.
            return self._call("head", name, lambda: b"" if self._exists(name) else None)

        def get_range() -> bytes | None:
            try:
                response = self._client.get_object(
                    Bucket=self.bucket, Key=name, Range=f"bytes={offset}-{offset + length - 1}"
                )
            except botocore.exceptions.ClientError as err:
                code = _code(err)
                if code in _NO_KEY:
                    return None
                if code == "InvalidRange":  # the object exists and ends before offset
                    return b""
                raise
            data = bytes(response["Body"].read())
            if "ContentRange" not in response:  # a server that ignored Range sent it all
                data = data[offset : offset + length]
            return data

        return self._call("get", name, get_range)

    def exists(self, key: str) -> bool:
        name = self._name(key)
        return bool(self._call("head", name, lambda: self._exists(name)))

    def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        name = self._name(key)
        body = bytes(memoryview(data).cast("B"))
        self._call(
            "put", name, lambda: self._client.put_object(Bucket=self.bucket, Key=name, Body=body)
        )

    def delete(self, key: str) -> None:
        name = self._name(key)

        def delete() -> None:
            try:
                self._client.delete_object(Bucket=self.bucket, Key=name)
            except botocore.exceptions.ClientError as err:
                if _code(err) not in _NO_KEY:
                    raise

        self._call("delete", name, delete)

    def list(self, prefix: str = "") -> Iterator[str]:
        """Every page of ListObjectsV2, then sorted: S3 itself lists in byte order, but some
        S3 servers do not (SeaweedFS walks its directory tree: ``a/1`` before ``a-b``)."""
        self._check_open()
        if not _PREFIX.fullmatch(prefix):
            raise StorageError(errno.EINVAL, f"invalid object key prefix {prefix!r}")
        full_prefix = self.prefix + prefix
        strip = len(self.prefix)
        keys: builtins.list[str] = []
        token: str | None = None
        while True:
            arguments: dict[str, Any] = {
                "Bucket": self.bucket,
                "Prefix": full_prefix,
                "MaxKeys": self._page_size,
            }
            if token is not None:
                arguments["ContinuationToken"] = token
            page = self._call(
                "list", full_prefix, functools.partial(self._client.list_objects_v2, **arguments)
            )
            for entry in page.get("Contents", ()):
                key = entry["Key"][strip:]
                if _is_key(key):  # objects written by others may not be keys of the contract
                    keys.append(key)
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return iter(sorted(keys))

    def sync(self) -> None:
        # Every put and delete that returned was acknowledged by S3, which acknowledges only
        # what it has stored durably: there is nothing left to make durable.
        self._check_open()

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        close = getattr(self._client, "close", None)  # botocore >= 1.33
        if close is not None:
            close()

    # -- Internals ---------------------------------------------------------------------------

    def _name(self, key: str) -> str:
        """The S3 object name of ``key`` (checked)."""
        self._check_open()
        check_key(key)
        return self.prefix + key

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(
                errno.EBADF, f"object store s3://{self.bucket}/{self.prefix} is closed"
            )

    def _exists(self, name: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=name)
        except botocore.exceptions.ClientError as err:
            if _code(err) in _NO_KEY:
                return False
            raise
        return True

    def _create_bucket(self, region: str | None) -> None:
        def create() -> None:
            arguments: dict[str, Any] = {"Bucket": self.bucket}
            if region and region != "us-east-1":
                arguments["CreateBucketConfiguration"] = {"LocationConstraint": region}
            try:
                self._client.create_bucket(**arguments)
            except botocore.exceptions.ClientError as err:
                if _code(err) not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                    raise

        self._call("create bucket", "", create)

    def _call(self, what: str, name: str, func: Callable[[], T]) -> T:
        """``func()``, retried while it fails transiently and the budget lasts; S3 and
        connection errors become :class:`StorageError`."""
        self._check_open()
        start = time.monotonic()
        delay = self._backoff
        attempt = 1
        while True:
            try:
                return func()
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as err:
                error = self._error(what, name, err)
                if error.errno not in TRANSIENT:
                    raise error from err
                pause = random.uniform(delay / 2, delay)
                spent = time.monotonic() - start
                if attempt >= self._attempts or spent + pause > self._deadline:
                    raise StorageError(
                        error.errno,
                        f"{error.message}; gave up after {attempt} attempts in {spent:.1f} s",
                    ) from err
                log.warning(
                    "%s (attempt %d of %d, retrying)", error.message, attempt, self._attempts
                )
                time.sleep(pause)
                delay = min(delay * 2, self._max_backoff)
                attempt += 1

    def _error(self, what: str, name: str, err: Exception) -> StorageError:
        """The StorageError that ``err`` (from ``what`` on object ``name``) means."""
        where = f"S3 {what} s3://{self.bucket}/{name}"
        if isinstance(err, botocore.exceptions.ClientError):
            code = _code(err)
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            message = err.response.get("Error", {}).get("Message", "")
            text = f"{where}: {code} (HTTP {status}) {message}".rstrip()
            if code == "NoSuchBucket":
                return StorageError(
                    errno.ENOENT, f"{where}: bucket {self.bucket!r} does not exist ({code})"
                )
            # The code first: QuotaExceeded, for one, comes with HTTP 403.
            if code in _FULL or status == _HTTP_INSUFFICIENT_STORAGE:
                return StorageError(errno.ENOSPC, text)
            if code in _REFUSED or status in {401, 403}:
                return StorageError(errno.EACCES, text)
            if code in _THROTTLED or status >= 500 or status == _HTTP_TOO_MANY_REQUESTS:
                return StorageError(errno.EIO, text)
            if code in {"InvalidArgument", "InvalidRequest", "KeyTooLongError"}:
                return StorageError(errno.EINVAL, text)
            # Any other refusal is not going to change by itself: not retried here.
            return StorageError(errno.EPROTO, text)
        text = f"{where}: {type(err).__name__}: {err}"
        if isinstance(err, botocore.exceptions.ParamValidationError):
            return StorageError(errno.EINVAL, text)
        if isinstance(
            err, botocore.exceptions.ConnectTimeoutError | botocore.exceptions.ReadTimeoutError
        ):
            return StorageError(errno.ETIMEDOUT, text)
        if isinstance(err, botocore.exceptions.SSLError):
            # A certificate or TLS mismatch: trying again will not fix it.
            return StorageError(errno.EPROTO, text)
        if isinstance(
            err,
            botocore.exceptions.ConnectionError
            | botocore.exceptions.HTTPClientError
            | botocore.exceptions.IncompleteReadError,
        ):
            # Refused, reset, closed or cut short: the server went away, maybe briefly.
            return StorageError(errno.ECONNRESET, text)
        if isinstance(
            err,
            botocore.exceptions.NoCredentialsError
            | botocore.exceptions.PartialCredentialsError
            | botocore.exceptions.NoRegionError,
        ):
            return StorageError(errno.EACCES, text)
        return StorageError(errno.EIO, text)

    def __repr__(self) -> str:
        where = f" at {self.endpoint}" if self.endpoint else ""
        return f"S3ObjectStore('s3://{self.bucket}/{self.prefix}'{where})"


def _code(err: botocore.exceptions.ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


def _is_key(key: str) -> bool:
    try:
        check_key(key)
    except StorageError:
        return False
    return True
