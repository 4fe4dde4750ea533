"""One storage abstraction for a local directory or ``s3://bucket/prefix`` (AWS, MinIO, Ceph, moto).

    st = open_storage("s3://bucket/datasets/msrvtt", endpoint_url="http://minio:9000")
    st.check()                                   # missing bucket / bad credentials -> StorageError now
    st.write_bytes("a/b.json", b"{}"); st.read_bytes("a/b.json"); st.list("a/")
    fs, root = st.pyarrow_filesystem()           # for Ray Data / Ray Train / pyarrow; st.arrow_path("videos")

Paths given to the methods are relative to the storage root (``'/'``-separated). Credentials come
only from the standard AWS chain (env, shared config/credentials files, instance/pod roles) and
never appear in errors or logs: every message is composed here, and any key material that a
server echoes back is redacted.

Retries: boto3 uses botocore's ``standard`` retry mode (throttling, 5xx, connection resets, with
exponential backoff and jitter, ``max_attempts`` tries). pyarrow's S3 filesystem gets its own
``AwsStandardS3RetryStrategy``; on top of both, :func:`retry_call` retries a whole read on errors
that look transient (503 / SlowDown / connection reset / timeouts), with exponential backoff.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

_TRANSIENT = re.compile(
    r"(SlowDown|Throttl|RequestTimeout|ServiceUnavailable|InternalError|\b50[0234]\b|"
    r"Connection reset|ConnectionReset|connection was closed|Broken pipe|timed out|Timeout|"
    r"NETWORK_CONNECTION|Temporary failure|EndpointConnectionError|IncompleteRead|"
    r"curlCode: (?:7|28|52|55|56))", re.IGNORECASE)


class StorageError(RuntimeError):
    """A storage URI cannot be used; the message names the URI and what to do."""


class StorageNotFound(StorageError, FileNotFoundError):
    """An object / file does not exist."""


def is_transient(err: BaseException) -> bool:
    """True for errors worth retrying: throttling, 5xx, connection resets, timeouts."""
    if isinstance(err, StorageNotFound | FileNotFoundError | PermissionError):
        return False
    if isinstance(err, ConnectionError | TimeoutError):
        return True
    code = _client_error_code(err)
    if code is not None:
        return code in {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
                        "ServiceUnavailable", "500", "502", "503", "504", "RequestTimeTooSkewed"}
    return bool(_TRANSIENT.search(f"{type(err).__name__}: {err}"))


def retry_call(fn: Callable[[], T], *, what: str, attempts: int = 5, base_delay: float = 0.2,
               max_delay: float = 5.0) -> T:
    """Call ``fn`` and retry transient failures with exponential backoff and full jitter."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - filtered by is_transient
            if i == attempts - 1 or not is_transient(err):
                raise
            delay = min(max_delay, base_delay * 2 ** i) * (0.5 + random.random() / 2)
            log.warning("transient storage error on %s (%s), retry %d/%d in %.2fs",
                        what, type(err).__name__, i + 1, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _client_error_code(err: BaseException) -> str | None:
    resp = getattr(err, "response", None)
    if isinstance(resp, dict):
        code = resp.get("Error", {}).get("Code")
        status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return str(code or status) if (code or status) else None
    return None


def _secrets() -> list[str]:
    """Key material of the current AWS chain, for redaction (never logged)."""
    vals = [os.environ.get(k, "") for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")]
    try:
        import boto3

        creds = boto3.session.Session().get_credentials()
        if creds is not None:
            frozen = creds.get_frozen_credentials()
            vals += [frozen.access_key or "", frozen.secret_key or "", frozen.token or ""]
    except Exception:  # noqa: BLE001 - redaction must never fail
        pass
    return [v for v in vals if len(v) >= 4]


def redact(text: str) -> str:
    for s in _secrets():
        text = text.replace(s, "***")
    return re.sub(r"(AWSAccessKeyId>)[^<]+", r"\1***", text)


def split_s3(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri}: an S3 URI must look like s3://bucket/prefix")
    return bucket, key.strip("/")


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


class OutsideRoot(StorageError):
    """A relative path (a manifest's video file, ...) that would leave the storage root."""


def escapes_root(rel: str) -> bool:
    """True when ``rel`` climbs above its root ('../x', 'a/../../x'; '\\' counts as '/'): such a
    path would read another folder locally, or another prefix or bucket on S3."""
    depth = 0
    for part in rel.replace("\\", "/").split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


def inside(root: str, rel: str) -> str:
    """``rel`` unchanged when it stays inside ``root``, else :class:`OutsideRoot`."""
    if escapes_root(rel):
        raise OutsideRoot(f"{rel!r} leaves the storage root {redact(root)} ('..'): refused, never read")
    return rel


class Storage:
    """A local directory or an S3 prefix. Picklable (clients are created lazily per process)."""

    def __init__(self, uri: str, *, endpoint_url: str | None = None, region: str | None = None,
                 max_attempts: int = 8):
        if not uri:
            raise StorageError("storage URI is empty: set storage.uri (a local directory or s3://bucket/prefix)")
        self.endpoint_url = endpoint_url or None
        self.region = region or None
        self.max_attempts = max_attempts
        if uri.startswith("s3://"):
            self.scheme = "s3"
            self.bucket, self.prefix = split_s3(uri)
            self.uri = f"s3://{_join(self.bucket, self.prefix)}"
            self.root = None
        elif "://" in uri and not uri.startswith("file://"):
            raise StorageError(f"{uri}: unsupported storage scheme; use a local path, file:// or s3://")
        else:
            self.scheme = "file"
            path = uri[len("file://"):] if uri.startswith("file://") else uri
            self.root = Path(path).expanduser().resolve()
            self.uri = str(self.root)
            self.bucket, self.prefix = None, ""
        self._client = None

    @classmethod
    def from_cfg(cls, cfg: Any, uri: str | None = None) -> Storage:
        """From a ``StorageCfg``-like object (uri, endpoint_url, region); ``uri`` overrides cfg.uri."""
        return cls(uri or cfg.uri, endpoint_url=getattr(cfg, "endpoint_url", None),
                   region=getattr(cfg, "region", None))

    def __repr__(self) -> str:
        ep = f", endpoint_url={self.endpoint_url!r}" if self.endpoint_url else ""
        return f"Storage({self.uri!r}{ep})"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    @property
    def is_s3(self) -> bool:
        return self.scheme == "s3"

    def child(self, rel: str) -> Storage:
        """A Storage rooted at ``<root>/<rel>`` with the same endpoint."""
        return Storage(self.url(rel), endpoint_url=self.endpoint_url, region=self.region,
                       max_attempts=self.max_attempts)

    def url(self, rel: str = "") -> str:
        """Full URI (or absolute local path) of ``rel``."""
        inside(self.uri, rel)
        if self.is_s3:
            return f"s3://{_join(self.bucket, self.prefix, rel)}"
        return str(self.root / rel.strip("/")) if rel.strip("/") else str(self.root)

    def _key(self, rel: str) -> str:
        return _join(self.prefix, inside(self.uri, rel))

    def _path(self, rel: str) -> Path:
        assert self.root is not None
        return self.root / inside(self.uri, rel).strip("/")

    # -- clients ---------------------------------------------------------------------------------
    def _resolved_region(self) -> str:
        if self.region:
            return self.region
        import boto3

        return boto3.session.Session().region_name or "us-east-1"

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            cfg = Config(retries={"max_attempts": self.max_attempts, "mode": "standard"},
                         connect_timeout=10, read_timeout=60, signature_version="s3v4")
            self._client = boto3.session.Session().client(
                "s3", endpoint_url=self.endpoint_url, region_name=self._resolved_region(), config=cfg)
        return self._client

    def pyarrow_filesystem(self) -> tuple[Any, str]:
        """(``pyarrow.fs`` filesystem, path of the root on it): S3 with the endpoint override
        ('bucket/prefix'), or the local filesystem (absolute path). Paths below the root:
        :meth:`arrow_path`."""
        return self._arrow_fs(), self.arrow_path()

    def _arrow_fs(self) -> Any:
        import pyarrow.fs as pafs

        if not self.is_s3:
            return pafs.LocalFileSystem()
        kwargs: dict[str, Any] = {"region": self._resolved_region(),
                                  "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=self.max_attempts),
                                  "connect_timeout": 10, "request_timeout": 60}
        if self.endpoint_url:
            scheme, _, hostport = self.endpoint_url.partition("://")
            kwargs["endpoint_override"] = hostport.rstrip("/") if hostport else scheme
            kwargs["scheme"] = scheme if hostport else "https"
        return pafs.S3FileSystem(**kwargs)  # credentials: the AWS chain, resolved by pyarrow

    def arrow_path(self, rel: str = "") -> str:
        """The path of ``rel`` on :meth:`pyarrow_filesystem` ('bucket/key' for S3)."""
        return _join(self.bucket, self.prefix, inside(self.uri, rel)) if self.is_s3 else self.url(rel)

    # -- errors ----------------------------------------------------------------------------------
    def _error(self, err: BaseException, rel: str, action: str) -> StorageError:
        where = self.url(rel)
        code = _client_error_code(err)
        name = type(err).__name__
        ep = f" at endpoint {self.endpoint_url}" if self.endpoint_url else ""
        if code in {"NoSuchKey", "404", "NotFound"} or isinstance(err, FileNotFoundError):
            return StorageNotFound(f"{where}: not found ({action}); check the path and data.root / storage.uri")
        if code == "NoSuchBucket":
            return StorageError(f"{where}: bucket {self.bucket!r} does not exist{ep}; create it "
                                f"(e.g. `aws s3 mb s3://{self.bucket}`) or fix storage.uri / data.root")
        if code in {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                    "AuthorizationHeaderMalformed", "InvalidClientTokenId"}:
            return StorageError(f"{where}: the S3 server{ep} rejected the credentials ({code}); set valid "
                                "credentials in the standard AWS chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                                "AWS_PROFILE, or an instance/pod role)")
        if code in {"AccessDenied", "403", "AllAccessDisabled"}:
            return StorageError(f"{where}: access denied{ep} ({action}); the credentials in the AWS chain "
                                f"lack permission for s3://{self.bucket} (need s3:ListBucket, s3:GetObject, "
                                "s3:PutObject) or are invalid; check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                                "AWS_PROFILE or the instance/pod role")
        if name in {"NoCredentialsError", "PartialCredentialsError"}:
            return StorageError(f"{where}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
                                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with an instance/pod role")
        if name in {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError"} \
                or isinstance(err, ConnectionError):
            return StorageError(f"{where}: cannot reach the S3 endpoint {self.endpoint_url or '(AWS)'} "
                                f"({name}); check storage.endpoint_url and the network")
        detail = redact(str(err).splitlines()[0] if str(err) else name)[:300]
        return StorageError(f"{where}: {action} failed: {name}: {detail}")

    def _do(self, fn: Callable[[], T], rel: str, action: str) -> T:
        try:
            return retry_call(fn, what=f"{action} {self.url(rel)}", attempts=max(1, min(3, self.max_attempts)))
        except StorageError:
            raise
        except Exception as err:  # noqa: BLE001 - turned into one clear error
            raise self._error(err, rel, action) from None

    # -- checks ----------------------------------------------------------------------------------
    def check(self, *, writable: bool = False) -> Storage:
        """Fail early with one clear :class:`StorageError` if the root cannot be used."""
        if not self.is_s3:
            if self.root.exists() and not self.root.is_dir():
                raise StorageError(f"{self.uri}: exists and is not a directory")
            if writable:
                try:
                    self.root.mkdir(parents=True, exist_ok=True)
                except OSError as err:
                    raise StorageError(f"{self.uri}: cannot create the directory ({err.strerror}); "
                                       "choose a writable path") from None
            elif not self.root.exists():
                raise StorageNotFound(f"{self.uri}: directory does not exist; create it or fix the URI")
            return self
        # A 1-key GET list (not HEAD: HEAD responses carry no error code) checks the endpoint, the
        # bucket, the credentials and the list permission at once.
        self._do(lambda: self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1),
                 "", "checking the bucket")
        return self

    # -- bytes -----------------------------------------------------------------------------------
    def read_bytes(self, rel: str) -> bytes:
        if not self.is_s3:
            try:
                return self._path(rel).read_bytes()
            except FileNotFoundError:
                raise StorageNotFound(f"{self.url(rel)}: not found") from None
            except IsADirectoryError:
                raise StorageError(f"{self.url(rel)}: is a directory, expected a file") from None
        return self._do(lambda: self.client.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"].read(),
                        rel, "reading")

    def write_bytes(self, rel: str, data: bytes) -> str:
        """Write ``data`` to ``rel`` (atomic rename locally); returns the full URI."""
        if not self.is_s3:
            path = self._path(rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            return str(path)
        self._do(lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data), rel, "writing")
        return self.url(rel)

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def exists(self, rel: str) -> bool:
        if not self.is_s3:
            return self._path(rel).exists()
        try:
            self._do(lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(rel)), rel, "checking")
            return True
        except StorageNotFound:
            return False

    def list(self, prefix: str = "") -> list[str]:
        """Relative paths of all files under ``prefix`` (recursive, sorted)."""
        if not self.is_s3:
            base = self._path(prefix)
            if base.is_file():
                return [prefix.strip("/")]
            if not base.exists():
                return []
            return sorted(str(p.relative_to(self.root)) for p in base.rglob("*")
                          if p.is_file() and not p.name.startswith("."))
        key_prefix = self._key(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        below = key_prefix.rstrip("/") + "/" if key_prefix else ""

        def keys() -> list[str]:
            paginator = self.client.get_paginator("list_objects_v2")
            return [o["Key"] for page in paginator.paginate(Bucket=self.bucket, Prefix=key_prefix)
                    for o in page.get("Contents", [])]

        out = [k[strip:] for k in self._do(keys, prefix, "listing")
               if not prefix.strip("/") or k == key_prefix or k.startswith(below)]
        return sorted(out)

    def delete(self, rel: str) -> None:
        if not self.is_s3:
            p = self._path(rel)
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            return
        for key in self.list(rel) or [rel]:
            self._do(lambda k=key: self.client.delete_object(Bucket=self.bucket, Key=self._key(k)), key, "deleting")

    # -- files -----------------------------------------------------------------------------------
    def upload_file(self, local: str | os.PathLike, rel: str) -> str:
        if not self.is_s3:
            dst = self._path(rel)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local, dst)
            return str(dst)
        self._do(lambda: self.client.upload_file(str(local), self.bucket, self._key(rel)), rel, "uploading")
        return self.url(rel)

    def upload_dir(self, local_dir: str | os.PathLike, prefix: str = "") -> list[str]:
        """Copy every file under ``local_dir`` to ``<prefix>/<relative path>``; returns the URIs."""
        base = Path(local_dir)
        if not base.is_dir():
            raise StorageError(f"{base}: not a directory (upload_dir)")
        return [self.upload_file(p, _join(prefix, str(p.relative_to(base).as_posix())))
                for p in sorted(base.rglob("*")) if p.is_file()]

    def download_file(self, rel: str, local: str | os.PathLike) -> Path:
        dst = Path(local)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not self.is_s3:
            src = self._path(rel)
            if not src.is_file():
                raise StorageNotFound(f"{self.url(rel)}: not found")
            shutil.copyfile(src, dst)
            return dst
        self._do(lambda: self.client.download_file(self.bucket, self._key(rel), str(dst)), rel, "downloading")
        return dst


def open_storage(uri: str, endpoint_url: str | None = None, region: str | None = None) -> Storage:
    """A :class:`Storage` for ``uri`` (local dir, file:// or s3://bucket/prefix)."""
    return Storage(uri, endpoint_url=endpoint_url, region=region)


def storage_for(job: Any, uri: str | None = None) -> Storage:
    """The Storage of ``uri`` (default: the job's storage root) with the job's S3 endpoint/region."""
    return Storage.from_cfg(job.storage, uri=uri or job.storage_uri)
