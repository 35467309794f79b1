"""Stores on S3-compatible object storage: ``s3://bucket/path.zarr`` URLs, the client, and shard leases.

The client is ``obstore`` (Rust's ``object_store``): requests run outside the GIL, ``put(mode="create")``
is S3's conditional ``If-None-Match: *`` and ``mode={"e_tag": ...}`` its ``If-Match``, which is all the
write protocol needs (store/SCHEMA.md, "Object storage"). Zarr reads and writes the same objects through
``zarr.storage.ObjectStore``. Credentials, region and endpoint come from the standard places only, resolved
by botocore (AWS_* variables, ``AWS_ENDPOINT_URL``, ``~/.aws/config`` and ``~/.aws/credentials``); they are
never written anywhere. Requests are bounded (a few retries, short connect timeout) so a wrong credential,
a missing bucket or an unreachable endpoint ends in seconds with one line naming the store.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import json
import os
import re
import socket
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from store.schema import ShardBusyError, StoreError

SCHEME = "s3://"
READ_THREADS = 8  # concurrent GETs: one S3 connection carries ~50-100 MB/s, a folder needs 2 threads
LEASE_SECONDS = 60.0  # a lease not renewed for this long belongs to a dead writer
RENEW_SECONDS = LEASE_SECONDS / 4
_CONNECT_TIMEOUT = "3s"
_REQUEST_TIMEOUT = "300s"  # one request; a 32 MiB shard takes well under a second on a LAN


def is_url(path: object) -> bool:
    """True for an object-store URL (``s3://bucket/key``), False for a local path."""
    return isinstance(path, (str, StoreURL)) and str(path).startswith(SCHEME)


@dataclasses.dataclass(frozen=True)
class StoreURL:
    """``s3://bucket/prefix`` with the few path operations the store uses (``name``, ``/``)."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str | StoreURL, whole_bucket: bool = False) -> StoreURL:
        """``whole_bucket``: ``s3://BUCKET`` (no prefix) is accepted too (a dataset root; never a store)."""
        if isinstance(url, StoreURL):
            return url
        rest = str(url)[len(SCHEME) :]
        bucket, _, prefix = rest.partition("/")
        prefix = prefix.strip("/")
        if not bucket or not (prefix or whole_bucket) or "//" in prefix:
            expected = "BUCKET[/PREFIX]" if whole_bucket else "BUCKET/PATH (a bucket and a key prefix)"
            raise StoreError(f"{url}: expected s3://{expected}")
        return cls(bucket, prefix)

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{SCHEME}{self.bucket}"

    def __truediv__(self, key: str) -> StoreURL:
        return StoreURL(self.bucket, f"{self.prefix}/{key}" if self.prefix else key)

    @property
    def name(self) -> str:
        return self.prefix.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix


def store_location(path: str | Path | StoreURL) -> str:
    """How a store is recorded (run dirs, sweeps): a local path made absolute, a URL as given."""
    return str(StoreURL.parse(path)) if is_url(path) else str(Path(path).resolve())


def _error_text(e: BaseException) -> str:
    """The short reason of an obstore error: S3's error code when the response has one."""
    text = str(e)
    code = re.search(r"<Code>([^<]+)</Code>", text)
    if code:
        reasons = {
            "NoSuchBucket": "the bucket does not exist",
            "InvalidAccessKeyId": "the access key is not valid (check AWS_ACCESS_KEY_ID)",
            "SignatureDoesNotMatch": "the secret key is wrong (check AWS_SECRET_ACCESS_KEY)",
            "AccessDenied": "access denied by the bucket's policy",
        }
        return reasons.get(code.group(1), code.group(1))
    if "error sending request" in text or "Connect" in text or "connection" in text.lower():
        return "cannot reach the endpoint (check AWS_ENDPOINT_URL and the network)"
    return text.splitlines()[0][:300] if text else type(e).__name__


def _session_settings() -> dict[str, Any]:
    """Region, endpoint and a credential provider from the standard AWS places, via botocore."""
    try:
        import boto3
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError as e:
        raise StoreError(
            f"stores on object storage need the s3 extra: pip install 'amflow[s3]' ({e.name} is missing)"
        ) from e
    session = boto3.Session()
    if session.get_credentials() is None:
        raise StoreError(
            "no AWS credentials found (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws/credentials or a "
            "profile in ~/.aws/config)"
        )
    settings: dict[str, Any] = {"credential_provider": Boto3CredentialProvider(session)}
    settings["region"] = session.region_name or "us-east-1"
    endpoint = session.client("s3", region_name=settings["region"]).meta.endpoint_url
    if endpoint and not re.search(r"\.amazonaws\.com(\.cn)?/?$", endpoint):
        settings["endpoint"] = endpoint
    return settings


_CLIENTS: dict[tuple[Any, ...], Any] = {}
_SETTINGS: dict[tuple[Any, ...], dict[str, Any]] = {}
_CLIENTS_LOCK = threading.Lock()
_STARTED_IN: set[int] = set()  # processes whose obstore runtime (its threads) has started


def _forked_after_start() -> bool:
    """True in a child forked from a process that had started obstore's runtime: the runtime's threads
    do not exist in the child, and any request there would hang forever."""
    return bool(_STARTED_IN) and os.getpid() not in _STARTED_IN


def _client(url: StoreURL) -> Any:
    """One obstore client per store, process and AWS environment (a client must not cross a fork; a
    changed AWS_* variable is a new client)."""
    context = (os.getpid(), *sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    key = (*context, url.bucket, url.prefix)
    if _forked_after_start():
        raise StoreError(
            f"{url}: object-store clients do not survive fork(); start worker processes with 'spawn' or "
            "'forkserver' (e.g. DataLoader(..., multiprocessing_context='spawn'))"
        )
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            from obstore.store import S3Store

            _STARTED_IN.add(os.getpid())

            if context not in _SETTINGS:
                _SETTINGS[context] = _session_settings()
            settings = _SETTINGS[context]
            endpoint = settings.get("endpoint", "")
            _CLIENTS[key] = S3Store(
                url.bucket,
                prefix=url.prefix or None,
                region=settings["region"],
                endpoint=endpoint or None,
                credential_provider=settings["credential_provider"],
                client_options={
                    "allow_http": endpoint.startswith("http://"),
                    "connect_timeout": _CONNECT_TIMEOUT,
                    "timeout": _REQUEST_TIMEOUT,
                },
                retry_config={
                    "max_retries": 2,
                    "retry_timeout": _dt.timedelta(seconds=8),
                    "backoff": {
                        "init_backoff": _dt.timedelta(milliseconds=100),
                        "max_backoff": _dt.timedelta(seconds=1),
                        "base": 2,
                    },
                },
            )
        return _CLIENTS[key]


class ObjectIO:
    """The objects under one store's prefix: get, ranged get, put (optionally conditional), delete, list.

    Every obstore error is raised as a one-line :class:`StoreError` naming the store (a missing object is
    ``None`` from :meth:`get`, not an error).
    """

    def __init__(self, url: StoreURL) -> None:
        self.url = url
        self.client = _client(url)

    def _fail(self, e: BaseException, what: str) -> StoreError:
        return StoreError(f"{self.url}: {what} failed: {_error_text(e)}")

    def get(self, key: str) -> Any | None:
        """The object's bytes (a buffer), or None when it does not exist."""
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            return obstore.get(self.client, key).bytes()
        except (NotFoundError, FileNotFoundError):
            return None
        except Exception as e:
            raise self._fail(e, f"reading {key}") from e

    def read_object(self, key: str, max_bytes: int) -> Any:
        """One whole object's bytes with one GET, its size checked against ``max_bytes`` from the response
        headers before the body is read. The failures of that one object are raised as the errors a local
        file gives, naming it: ``FileNotFoundError`` (absent), ``PermissionError`` (denied), ``ValueError``
        (larger than ``max_bytes``); anything else (endpoint, credentials) is a StoreError naming the
        store."""
        import obstore
        from obstore.exceptions import NotFoundError, PermissionDeniedError

        where = self.url / key
        try:
            result = obstore.get(self.client, key)
            size = int(result.meta["size"])
            if size > max_bytes:
                raise ValueError(f"{where}: {size} bytes, more than the {max_bytes} bytes allowed")
            return result.bytes()
        except (NotFoundError, FileNotFoundError):
            raise FileNotFoundError(f"{where}: no such object") from None
        except PermissionDeniedError:
            raise PermissionError(f"{where}: access denied by the bucket's policy") from None
        except ValueError:
            raise
        except Exception as e:
            raise self._fail(e, f"reading {key}") from e

    def get_ranges(self, key: str, starts: Sequence[int], ends: Sequence[int]) -> list[Any] | None:
        """Byte ranges of one object, fetched concurrently (None when the object does not exist)."""
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            return obstore.get_ranges(self.client, key, starts=list(starts), ends=list(ends))
        except (NotFoundError, FileNotFoundError):
            return None
        except Exception as e:
            raise self._fail(e, f"reading {key}") from e

    def head(self, key: str) -> dict[str, Any] | None:
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            return dict(obstore.head(self.client, key))
        except (NotFoundError, FileNotFoundError):
            return None
        except Exception as e:
            raise self._fail(e, f"reading {key}") from e

    def put(self, key: str, data: Any, mode: Any = "overwrite") -> dict[str, Any]:
        """Writes one object (visible whole or not at all); ``mode="create"`` / ``{"e_tag": ...}`` are
        S3's conditional writes and raise obstore's AlreadyExistsError / PreconditionError unchanged."""
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        try:
            return dict(obstore.put(self.client, key, data, mode=mode, use_multipart=False))
        except (AlreadyExistsError, PreconditionError):
            raise
        except Exception as e:
            raise self._fail(e, f"writing {key}") from e

    def delete(self, key: str) -> None:
        import obstore

        try:
            obstore.delete(self.client, key)
        except Exception as e:
            raise self._fail(e, f"deleting {key}") from e

    def list(self, under: str = "") -> Iterator[dict[str, Any]]:
        """Objects below ``under`` (relative keys in ``path``, with ``size`` and ``last_modified``)."""
        import obstore

        try:
            for batch in obstore.list(self.client, prefix=under or None):
                yield from (dict(meta) for meta in batch)
        except Exception as e:
            raise self._fail(e, "listing") from e

    def list_folder(self) -> tuple[list[str], list[str]]:
        """The prefix's own level: its sub-folders and its objects (relative keys), one LIST with a
        delimiter (paginated), nothing below."""
        import obstore

        try:
            found = obstore.list_with_delimiter(self.client)
        except Exception as e:
            raise self._fail(e, "listing") from e
        return [str(p) for p in found["common_prefixes"]], [str(m["path"]) for m in found["objects"]]

    def delete_all(self, keep: str | None = None) -> None:
        """Deletes every object of the store (those under ``keep`` excepted)."""
        import obstore

        keys = [m["path"] for m in self.list() if keep is None or not m["path"].startswith(keep)]
        for k in range(0, len(keys), 1000):
            try:
                obstore.delete(self.client, keys[k : k + 1000])
            except Exception as e:
                raise self._fail(e, "deleting") from e

    def zarr_store(self, read_only: bool) -> Any:
        """The same prefix as a Zarr store (``zarr.storage.ObjectStore``) whose errors are one-line
        StoreErrors naming the store, as this class's are."""
        return _zarr_store_class()(self.client, read_only=read_only, url=str(self.url))


@functools.cache
def _zarr_store_class() -> type:
    """``zarr.storage.ObjectStore`` with obstore's errors raised as :class:`StoreError` (made on first use:
    zarr's ObjectStore imports obstore, which only the s3 extra installs)."""
    from obstore.exceptions import BaseError
    from zarr.storage import ObjectStore

    def wrap(name: str) -> Any:
        method = getattr(ObjectStore, name)

        async def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return await method(self, *args, **kwargs)
            except BaseError as e:
                key = args[0] if args and isinstance(args[0], str) else ""
                raise StoreError(f"{self.url}: {name} {key} failed: {_error_text(e)}") from e

        return call

    class NamedObjectStore(ObjectStore):
        def __init__(self, store: Any, *, read_only: bool = False, url: str = "") -> None:
            super().__init__(store, read_only=read_only)
            self.url = url

        def with_read_only(self, read_only: bool = False) -> NamedObjectStore:
            return type(self)(self.store, read_only=read_only, url=self.url)

    for name in ("get", "get_partial_values", "exists", "set", "set_if_not_exists", "delete", "getsize"):
        setattr(NamedObjectStore, name, wrap(name))
    return NamedObjectStore


# ---------------------------------------------------------------------- leases (the object-store lock)
def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _owner() -> dict[str, Any]:
    host, pid = socket.gethostname(), os.getpid()
    return {"host": host, "boot": _boot_id(), "pid": pid, "token": os.urandom(8).hex()}


def _dead_here(owner: dict[str, Any]) -> bool:
    """True when the lease's owner was a process of this machine that no longer runs (killed)."""
    if owner.get("host") != socket.gethostname() or owner.get("boot") != _boot_id():
        return False
    try:
        os.kill(int(owner.get("pid", -1)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):
        return False
    return False


class ObjectLease:
    """An exclusive lease on ``key``, the object-store stand-in for ``flock`` (store/SCHEMA.md).

    Taken with a conditional create (``If-None-Match: *``); a lease left by a dead writer (a process of
    this machine that no longer runs, or one not renewed for ``lease_seconds``) is taken over with
    ``If-Match`` on its ETag, so of two writers taking it over one wins. A background thread renews it
    (``If-Match`` again) every ``lease_seconds / 4``; :meth:`check` (before a commit's data and before its
    status) finds a lease taken over by its ETag, and the writer raises instead of writing.
    """

    def __init__(self, objects: ObjectIO, key: str, what: str, lease_seconds: float = LEASE_SECONDS) -> None:
        self.objects, self.key, self.what = objects, key, what
        self.lease_seconds = lease_seconds
        self._body = json.dumps(_owner()).encode()
        self._etag: str | None = None
        self._lost = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def acquire(self) -> ObjectLease:
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        try:
            self._etag = self.objects.put(self.key, self._body, mode="create")["e_tag"]
        except AlreadyExistsError:
            meta = self.objects.head(self.key)
            body = self.objects.get(self.key)
            if meta is None or body is None:  # released meanwhile: try once more
                return self._retake(None)
            owner = json.loads(bytes(body) or b"{}")
            age = (_dt.datetime.now(_dt.timezone.utc) - meta["last_modified"]).total_seconds()
            if not (_dead_here(owner) or age > self.lease_seconds):
                raise ShardBusyError(
                    f"{self.objects.url}: {self.what} is being written by another writer (lease "
                    f"{self.key} held by {owner.get('host')} pid {owner.get('pid')}, renewed {age:.0f} s "
                    "ago); two writers inside one shard would lose data"
                ) from None
            return self._retake(meta["e_tag"])
        except PreconditionError:
            return self._retake(None)
        self._start()
        return self

    def _retake(self, etag: str | None) -> ObjectLease:
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        try:
            mode: Any = {"e_tag": etag} if etag else "create"
            self._etag = self.objects.put(self.key, self._body, mode=mode)["e_tag"]
        except (AlreadyExistsError, PreconditionError):
            raise ShardBusyError(
                f"{self.objects.url}: {self.what} was just taken by another writer (lease {self.key})"
            ) from None
        self._start()
        return self

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.key}", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        from obstore.exceptions import PreconditionError

        while not self._stop.wait(self.lease_seconds / 4):
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    self._etag = self.objects.put(self.key, self._body, mode={"e_tag": self._etag})["e_tag"]
                except PreconditionError:
                    self._lost = True
                    return
                except StoreError:  # a network hiccup: try again at the next tick
                    continue

    def check(self) -> None:
        """Raises :class:`ShardBusyError` when another writer took the lease over (this one stalled):
        the lease object must still be the version this writer last wrote (one HEAD)."""
        with self._lock:
            meta = self.objects.head(self.key)
            if meta is None or meta["e_tag"] != self._etag:
                self._lost = True
        if self._lost:
            raise ShardBusyError(
                f"{self.objects.url}: lost the lease on {self.what} ({self.key}) to another writer; "
                "nothing more is written"
            )

    def release(self) -> None:
        with self._lock:
            self._stop.set()
            if not self._lost and self._etag is not None:
                self.objects.delete(self.key)
            self._etag = None
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)


def default_read_threads(store: Any) -> int:
    """Shards read ahead at once by default: READ_THREADS from object storage (each request waits on the
    network), 2 from a folder (file reads overlap the copies into reused buffers; ``load_arrays``, which
    fills one fresh array, reads a folder on one thread)."""
    return READ_THREADS if store.objects is not None else 2
