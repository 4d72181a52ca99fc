"""One filesystem factory for bank locations: local paths, `file://` and `s3://bucket/prefix`.

S3 settings come from explicit config or the standard AWS variables, `AWS_ENDPOINT_URL` included (pyarrow's
`S3FileSystem` constructor ignores it, so it is passed as `endpoint_override`). Parquet I/O goes through pyarrow;
conditional writes (`If-None-Match`, `If-Match`) through boto3, which pyarrow lacks.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs


class StoreError(RuntimeError):
    """A storage problem; the message names the object."""


class CommitConflict(StoreError):
    """Another writer committed the same version first."""


@dataclass
class StorageConfig:
    """S3 connection settings. `repr` never shows secrets."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    session_token: str | None = None

    @classmethod
    def from_env(cls, **overrides) -> "StorageConfig":
        env = os.environ
        cfg = cls(
            endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
            access_key=env.get("AWS_ACCESS_KEY_ID"),
            secret_key=env.get("AWS_SECRET_ACCESS_KEY"),
            session_token=env.get("AWS_SESSION_TOKEN"),
        )
        for k, v in overrides.items():
            if v is not None:
                setattr(cfg, k, v)
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)

    def __repr__(self) -> str:
        return f"StorageConfig(endpoint_url={self.endpoint_url!r}, region={self.region!r}, credentials={'set' if self.access_key else 'default chain'})"


def _pyarrow_s3(cfg: StorageConfig) -> pafs.S3FileSystem:
    kw: dict = {"region": cfg.region or "us-east-1"}
    if cfg.endpoint_url:
        u = urlparse(cfg.endpoint_url)
        kw["endpoint_override"] = u.netloc or u.path
        kw["scheme"] = u.scheme or "https"
    if cfg.access_key:
        kw.update(access_key=cfg.access_key, secret_key=cfg.secret_key, session_token=cfg.session_token)
    return pafs.S3FileSystem(**kw)


def boto3_client(cfg: StorageConfig):
    import boto3

    return boto3.client(
        "s3", endpoint_url=cfg.endpoint_url, region_name=cfg.region or "us-east-1",
        aws_access_key_id=cfg.access_key, aws_secret_access_key=cfg.secret_key, aws_session_token=cfg.session_token,
    )


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (`os.umask` alone sets it, racing other
    threads' file creation)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_copy(target: Path, data: bytes) -> Path:
    """`data` written and fsynced to a hidden temp file beside `target` (same filesystem, so rename/link are atomic).

    `mkstemp` creates its file with mode 0600 whatever the umask; the file gets the mode `open()` would have given
    (0666 under the umask, e.g. 0644), so labels and bank files are readable as any other file the user writes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


class Location:
    """A bank root: local folder or S3 prefix. Keys are `/`-separated paths relative to the root."""

    def __init__(self, uri: str, storage: StorageConfig | dict | None = None):
        self.uri = str(uri).rstrip("/")
        u = urlparse(self.uri)
        self.is_s3 = u.scheme == "s3"
        if isinstance(storage, dict):
            storage = StorageConfig(**storage)
        self.storage = storage or StorageConfig.from_env()
        if self.is_s3:
            if not u.netloc:
                raise StoreError(f"{uri}: an S3 URI needs a bucket (s3://bucket/prefix)")
            self.bucket, self.prefix = u.netloc, u.path.strip("/")
            self.fs: pafs.FileSystem = _pyarrow_s3(self.storage)
            self.root = f"{self.bucket}/{self.prefix}".rstrip("/")
            self._s3 = None
        elif u.scheme in ("", "file"):
            path = u.path if u.scheme == "file" else self.uri
            self.root = str(Path(path).expanduser().resolve())
            self.fs = pafs.LocalFileSystem()
        else:
            raise StoreError(f"{uri}: unsupported scheme {u.scheme!r} (use a local path, file:// or s3://)")

    # -- naming ---------------------------------------------------------------------------------------------------
    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def display(self, key: str) -> str:
        return f"{self.uri}/{key}"

    @property
    def s3(self):
        if self._s3 is None:
            self._s3 = boto3_client(self.storage)
        return self._s3

    def s3_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    # -- reads ----------------------------------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return self.fs.get_file_info(self.path(key)).type != pafs.FileType.NotFound

    def read_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        try:
            with self.fs.open_input_file(self.path(key)) as f:
                if max_bytes is not None and f.size() > max_bytes:
                    raise StoreError(f"{self.display(key)}: {f.size()} bytes, over the limit of {max_bytes}")
                return f.read()
        except FileNotFoundError:
            raise StoreError(f"{self.display(key)}: not found") from None
        except OSError as e:
            if "not found" in str(e).lower() or "does not exist" in str(e).lower():
                raise StoreError(f"{self.display(key)}: not found") from None
            raise StoreError(f"{self.display(key)}: cannot read: {e}") from None

    def list(self, prefix: str) -> list[str]:
        sel = pafs.FileSelector(self.path(prefix), allow_not_found=True, recursive=False)
        return sorted(i.path[len(self.root) + 1:] for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File)

    # -- writes ---------------------------------------------------------------------------------------------------
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write an object whole: locally to a temp file then rename; on S3 one PUT (atomic by nature)."""
        if self.is_s3:
            self.s3.put_object(Bucket=self.bucket, Key=self.s3_key(key), Body=data)
            return
        target = Path(self.path(key))
        tmp = _temp_copy(target, data)
        try:
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def put_if_absent(self, key: str, data: bytes) -> None:
        """Create `key` only if it does not exist; CommitConflict otherwise (S3 `If-None-Match: *`, local link())."""
        if self.is_s3:
            from botocore.exceptions import ClientError

            try:
                self.s3.put_object(Bucket=self.bucket, Key=self.s3_key(key), Body=data, IfNoneMatch="*")
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                    raise CommitConflict(f"{self.display(key)} already exists: another writer committed it") from None
                raise
            return
        target = Path(self.path(key))
        tmp = _temp_copy(target, data)
        try:
            os.link(tmp, target)  # atomic, fails if the target exists
        except FileExistsError:
            raise CommitConflict(f"{self.display(key)} already exists: another writer committed it") from None
        finally:
            tmp.unlink(missing_ok=True)

    def swap_pointer(self, key: str, data: bytes, expect: bytes | None) -> bool:
        """Replace `key` if its content is still `expect` (None: absent). S3 `If-Match`/`If-None-Match`.

        Returns False when someone else moved it first.
        """
        if self.is_s3:
            from botocore.exceptions import ClientError

            kw: dict = {"IfNoneMatch": "*"}
            if expect is not None:
                try:
                    head = self.s3.get_object(Bucket=self.bucket, Key=self.s3_key(key))
                except ClientError:
                    return False
                if head["Body"].read() != expect:
                    return False
                kw = {"IfMatch": head["ETag"]}
            try:
                self.s3.put_object(Bucket=self.bucket, Key=self.s3_key(key), Body=data, **kw)
                return True
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                    return False
                raise
        import fcntl

        target = Path(self.path(key))
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / f".{target.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = target.read_bytes() if target.exists() else None
            if current != expect:
                return False
            self.write_bytes(key, data)
            return True
