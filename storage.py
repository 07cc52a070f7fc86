"""Buckets and the Hugging Face Hub behind small interfaces.

URIs stay `gs://bucket/key` everywhere; `LocalBlobStore(root)` maps them to `root/bucket/key`,
`GcsBlobStore` talks to Google Cloud Storage (or the emulator named by STORAGE_EMULATOR_HOST).
"""

from __future__ import annotations

import base64
import functools
import logging
import os
import shutil
from pathlib import Path
from typing import Protocol

from runtime.errors import PermanentError

logger = logging.getLogger(__name__)


class MissingObject(PermanentError, FileNotFoundError):
    """The object is not in the bucket."""


def parse_gs_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("gs://"):
        raise ValueError(f"not a gs:// URI: {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    if not bucket or ".." in key.split("/"):
        raise ValueError(f"invalid gs:// URI: {uri!r}")
    return bucket, key


def crc32c(path: Path) -> str:
    """A file's CRC32C as GCS keeps an object's: base64 of its four big-endian bytes."""
    import google_crc32c

    found = google_crc32c.Checksum()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            found.update(chunk)
    return base64.b64encode(found.digest()).decode()


class BlobStore(Protocol):
    def read_bytes(self, uri: str) -> bytes: ...
    def list(self, prefix_uri: str) -> list[str]: ...
    def stat(self, prefix_uri: str) -> dict[str, tuple[int, str]]:
        """Each object under prefix_uri: its size and CRC32C (crc32c's form), as the store has them."""
    def download(self, uri: str, path: Path) -> Path: ...
    def write_bytes(self, uri: str, data: bytes) -> None: ...
    def write_new(self, uri: str, data: bytes) -> bool:
        """Create the object only if there is none: False, and nothing written, if one exists."""
    def delete_prefix(self, prefix_uri: str) -> None: ...
    def upload_dir(self, local_dir: Path, prefix_uri: str) -> list[str]:
        """Upload every file under local_dir to prefix_uri/, then remove objects there that the
        folder does not have (a stale earlier run's files never mix with the new ones)."""

    def download_dir(self, prefix_uri: str, local_dir: Path, names: list[str]) -> list[Path]:
        """Download the objects prefix_uri/{name} to local_dir/{name}, concurrently where the store can."""


def _files(local_dir: Path) -> list[Path]:
    return sorted(p for p in Path(local_dir).rglob("*") if p.is_file())


class LocalBlobStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._sums: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> CRC32C: each file read once

    def path(self, uri: str) -> Path:
        bucket, key = parse_gs_uri(uri)
        return self.root / bucket / key

    def read_bytes(self, uri: str) -> bytes:
        p = self.path(uri)
        if not p.is_file():
            raise MissingObject(f"{uri} not found (local backend: {p})")
        return p.read_bytes()

    def list(self, prefix_uri: str) -> list[str]:
        base = self.path(prefix_uri)
        bucket, _ = parse_gs_uri(prefix_uri)
        if not base.is_dir():
            return []
        return [f"gs://{bucket}/{p.relative_to(self.root / bucket).as_posix()}" for p in _files(base)]

    def stat(self, prefix_uri: str) -> dict[str, tuple[int, str]]:
        found = {}
        for uri in self.list(prefix_uri):
            path = self.path(uri)
            info = path.stat()
            key = (str(path), info.st_size, info.st_mtime_ns)
            if key not in self._sums:
                self._sums[key] = crc32c(path)
            found[uri] = (info.st_size, self._sums[key])
        return found

    def download(self, uri: str, path: Path) -> Path:
        src = self.path(uri)
        if not src.is_file():
            raise MissingObject(f"{uri} not found (local backend: {src})")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.downloading")
        shutil.copyfile(src, tmp)
        os.replace(tmp, path)  # whole or not at all, whoever else is reading or writing it
        return path

    def download_dir(self, prefix_uri: str, local_dir: Path, names: list[str]) -> list[Path]:
        prefix = prefix_uri.rstrip("/") + "/"
        return [self.download(prefix + name, Path(local_dir) / name) for name in names]

    def write_bytes(self, uri: str, data: bytes) -> None:
        p = self.path(uri)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".writing")
        tmp.write_bytes(data)
        os.replace(tmp, p)

    def write_new(self, uri: str, data: bytes) -> bool:
        p = self.path(uri)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f"{p.name}.{os.getpid()}.writing")
        tmp.write_bytes(data)
        try:
            os.link(tmp, p)  # whole, and only if the name is free (a link never replaces)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def delete_prefix(self, prefix_uri: str) -> None:
        shutil.rmtree(self.path(prefix_uri), ignore_errors=True)

    def upload_dir(self, local_dir: Path, prefix_uri: str) -> list[str]:
        dest = self.path(prefix_uri.rstrip("/") + "/")
        staging = dest.with_name(dest.name + ".uploading")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(local_dir, staging)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(staging, dest)  # the folder appears whole or not at all
        return [f"{prefix_uri.rstrip('/')}/{p.relative_to(local_dir).as_posix()}" for p in _files(local_dir)]


class GcsBlobStore:
    """Google Cloud Storage with the official client; uploads run concurrently and are checksummed."""

    def __init__(self, project: str | None = None, workers: int = 8, give_up_s: float = 300.0):
        self.project, self.workers = project, workers
        self.give_up_s = give_up_s  # writes retried through an outage this long (settings.give_up_s)

    @functools.cached_property
    def client(self):
        """Made on first use, inside the job's failure handling (missing credentials get recorded)."""
        from google.cloud import storage

        return storage.Client(project=self.project)

    def _blob(self, uri: str):
        bucket, key = parse_gs_uri(uri)
        return self.client.bucket(bucket).blob(key)

    def read_bytes(self, uri: str) -> bytes:
        from google.api_core.exceptions import NotFound

        try:
            return self._blob(uri).download_as_bytes()
        except NotFound:
            raise MissingObject(f"{uri} not found") from None

    def list(self, prefix_uri: str) -> list[str]:
        bucket, key = parse_gs_uri(prefix_uri)
        return [f"gs://{bucket}/{b.name}" for b in self.client.list_blobs(bucket, prefix=key)]

    def stat(self, prefix_uri: str) -> dict[str, tuple[int, str]]:
        bucket, key = parse_gs_uri(prefix_uri)  # the listing carries both: nothing is downloaded
        return {f"gs://{bucket}/{b.name}": (b.size, b.crc32c) for b in self.client.list_blobs(bucket, prefix=key)}

    def download(self, uri: str, path: Path) -> Path:
        from google.api_core.exceptions import NotFound

        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._blob(uri).download_to_filename(str(path), checksum="crc32c")
        except NotFound:
            raise MissingObject(f"{uri} not found") from None
        return path

    def download_dir(self, prefix_uri: str, local_dir: Path, names: list[str]) -> list[Path]:
        """All at once with the library's transfer manager (threads: the files are a checkpoint's few large
        shards and optimizer state, where one at a time left the link idle between files), checksummed."""
        from google.api_core.exceptions import NotFound
        from google.cloud.storage import transfer_manager

        bucket_name, key = parse_gs_uri(prefix_uri.rstrip("/") + "/")
        try:  # raise_exception: the first failed download is raised here
            transfer_manager.download_many_to_path(
                self.client.bucket(bucket_name), names, destination_directory=str(local_dir), blob_name_prefix=key,
                download_kwargs={"checksum": "crc32c"}, raise_exception=True, max_workers=self.workers,
                worker_type=transfer_manager.THREAD)
        except NotFound:
            raise MissingObject(f"an object under {prefix_uri} is gone") from None
        return [Path(local_dir) / n for n in names]

    def write_bytes(self, uri: str, data: bytes) -> None:
        from google.cloud.storage.retry import DEFAULT_RETRY

        self._blob(uri).upload_from_string(data, checksum="crc32c",
                                           retry=DEFAULT_RETRY.with_timeout(self.give_up_s))

    def write_new(self, uri: str, data: bytes) -> bool:
        from google.api_core.exceptions import PreconditionFailed
        from google.cloud.storage.retry import DEFAULT_RETRY

        try:  # generation 0: only if no live object has the name; with a precondition the retry is safe
            self._blob(uri).upload_from_string(data, checksum="crc32c", if_generation_match=0,
                                               retry=DEFAULT_RETRY.with_timeout(self.give_up_s))
            return True
        except PreconditionFailed:
            return False

    def delete_prefix(self, prefix_uri: str) -> None:
        bucket, key = parse_gs_uri(prefix_uri)
        for blob in self.client.list_blobs(bucket, prefix=key):
            blob.delete()

    def upload_dir(self, local_dir: Path, prefix_uri: str) -> list[str]:
        from google.cloud.storage import transfer_manager
        from google.cloud.storage.retry import DEFAULT_RETRY

        bucket_name, key = parse_gs_uri(prefix_uri.rstrip("/") + "/")
        bucket = self.client.bucket(bucket_name)
        names = [p.relative_to(local_dir).as_posix() for p in _files(local_dir)]
        transfer_manager.upload_many_from_filenames(  # raise_exception: the first failed upload is raised here
            bucket, names, source_directory=str(local_dir), blob_name_prefix=key, max_workers=self.workers,
            # An explicit retry: uploads without a generation precondition are not retried by default, and
            # a resumable upload cut off mid-file resumes where it stopped. Same bytes, so it is idempotent.
            upload_kwargs={"checksum": "crc32c", "retry": DEFAULT_RETRY.with_timeout(self.give_up_s)},
            raise_exception=True, worker_type=transfer_manager.THREAD)
        wanted = {key + n for n in names}
        for blob in self.client.list_blobs(bucket_name, prefix=key):
            if blob.name not in wanted:
                blob.delete()
        return [f"gs://{bucket_name}/{key}{n}" for n in names]


class ModelHub(Protocol):
    def check_read(self, repo_id: str) -> None:
        """A PermanentError unless the token can read this Hub model (before anything is trained)."""
    def prepare_repo(self, repo_id: str, private: bool) -> None:
        """Create the destination repo if needed; a PermanentError unless the token can write to it."""
    def push_folder(self, local_dir: Path, repo_id: str, path_in_repo: str, private: bool) -> str:
        """Make path_in_repo of an existing repo the folder, in one commit: its files added or replaced, and
        the files an earlier run left there that it lacks deleted (as upload_dir mirrors a bucket folder);
        return the commit's URL."""
    def license(self, repo_id: str) -> str | None:
        """The licence in a Hub model's card metadata, if it has one."""
    def download_adapter(self, repo_id: str, local_dir: Path, names: list[str]) -> None:
        """An adapter's files from the root of a Hub repo into local_dir; a PermanentError if the repo or a
        file is missing or the token cannot read it."""


class LocalModelHub:
    """A stand-in Hub on disk: `{root}/hub/{repo_id}/{path_in_repo}`."""

    def __init__(self, root: str | Path):
        self.root = Path(root) / "hub"

    def check_read(self, repo_id: str) -> None:
        return None  # the local backend never reaches the Hub; loading the model says what is wrong

    def prepare_repo(self, repo_id: str, private: bool) -> None:
        (self.root / repo_id).mkdir(parents=True, exist_ok=True)

    def push_folder(self, local_dir: Path, repo_id: str, path_in_repo: str, private: bool) -> str:
        dest = self.root / repo_id / path_in_repo
        wanted = {p.relative_to(local_dir) for p in local_dir.rglob("*") if p.is_file()}
        for old in [p for p in dest.rglob("*") if p.is_file()] if dest.is_dir() else []:
            if old.relative_to(dest) not in wanted and old.name != ".gitattributes":
                old.unlink()  # a mirror, as HfModelHub's delete_patterns make the Hub repo
        shutil.copytree(local_dir, dest, dirs_exist_ok=True)
        return f"file://{dest.resolve()}"

    def license(self, repo_id: str) -> str | None:
        return None  # the local backend never reaches the Hub

    def download_adapter(self, repo_id: str, local_dir: Path, names: list[str]) -> None:
        missing = [n for n in names if not (self.root / repo_id / n).is_file()]
        if missing:
            raise PermanentError(f"training_config.init_adapter: {repo_id!r} has no {', '.join(missing)} (local "
                                 f"backend: {self.root / repo_id}); name a repo holding a PEFT adapter.")
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        for n in names:
            shutil.copyfile(self.root / repo_id / n, Path(local_dir) / n)


class HfModelHub:
    """The Hugging Face Hub through huggingface_hub. The token is passed per client, never written to
    disk with `login()` (a token file in the container would outlive the job)."""

    def __init__(self, token: str | None, endpoint: str | None = None):
        from huggingface_hub import HfApi

        self.api = HfApi(token=token, endpoint=endpoint)
        self.has_token = token is not None

    def _access_error(self, err: Exception, repo_id: str, field: str, need: str) -> PermanentError | None:
        from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

        token = "the token" if self.has_token else "no token (set hf_token in the request or HF_TOKEN)"
        if isinstance(err, GatedRepoError):
            return PermanentError(f"{field}: {repo_id!r} is gated and {token} has not been granted access; "
                                  "accept its licence on the Hub with the token's account.")
        if isinstance(err, RepositoryNotFoundError):
            return PermanentError(f"{field}: {repo_id!r} was not found on the Hub or {token} cannot {need} it; "
                                  "check the id and the token's permissions.")
        status = getattr(getattr(err, "response", None), "status_code", None)
        if isinstance(err, HfHubHTTPError) and status in (401, 403):
            return PermanentError(f"{field}: {token} cannot {need} {repo_id!r} on the Hub (HTTP {status}); "
                                  "use a token with write access to the repo or its namespace.")
        return None  # 5xx, timeouts: a retry may succeed

    def check_read(self, repo_id: str) -> None:
        from huggingface_hub.errors import HfHubHTTPError

        try:
            self.api.auth_check(repo_id)
        except HfHubHTTPError as e:
            raise self._access_error(e, repo_id, "training_config.base_model_id", "read") or e from None

    def prepare_repo(self, repo_id: str, private: bool) -> None:
        from huggingface_hub.errors import HfHubHTTPError

        field = "export_config.hf_repo_id"
        try:
            self.api.create_repo(repo_id, private=private, exist_ok=True)
            self.api.auth_check(repo_id, write=True)
        except HfHubHTTPError as e:
            raise self._access_error(e, repo_id, field, "write to") or e from None

    def push_folder(self, local_dir: Path, repo_id: str, path_in_repo: str, private: bool) -> str:
        # delete_patterns: in the same commit, the repo's files under path_in_repo that this folder lacks
        # go (relative to path_in_repo; the Hub keeps .gitattributes whatever the pattern)
        info = self.api.upload_folder(repo_id=repo_id, folder_path=str(local_dir), path_in_repo=path_in_repo or None,
                                      commit_message=f"Upload {path_in_repo or 'model'}", delete_patterns="*")
        return str(getattr(info, "commit_url", f"https://huggingface.co/{repo_id}"))

    def license(self, repo_id: str) -> str | None:
        card = self.api.model_info(repo_id).card_data
        return card.license if card else None

    def download_adapter(self, repo_id: str, local_dir: Path, names: list[str]) -> None:
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

        field = "training_config.init_adapter"
        for name in names:
            try:
                self.api.hf_hub_download(repo_id, name, local_dir=str(local_dir))
            except EntryNotFoundError:
                raise PermanentError(f"{field}: {repo_id!r} has no {name} at its root; name a repo holding a PEFT "
                                     "adapter (adapter_config.json and adapter_model.safetensors).") from None
            except HfHubHTTPError as e:
                raise self._access_error(e, repo_id, field, "read") or e from None
