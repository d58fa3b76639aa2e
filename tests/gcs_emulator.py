"""A Google Cloud Storage emulator on 127.0.0.1 for the `gs://` tests, and the settings that point each client at it.

Clients of the project's `gs://` paths and how they reach the emulator:
  * TensorStore (Orbax's array data): `TENSORSTORE_GCS_HTTP_URL` (its GCS endpoint) and
    `GOOGLE_AUTH_TOKEN_FOR_TESTING` (a fixed bearer token instead of Google credentials).
  * etils.epath (every other file: Orbax's metadata and commit markers, config.json, metrics.jsonl, TensorBoard
    events, converted-checkpoint JSON, iterator states): through its fsspec backend, i.e. gcsfs, which
    honours `STORAGE_EMULATOR_HOST`. When TensorFlow is installed epath sends `gs://` to tf.io.gfile instead, and
    TensorFlow's GCS filesystem cannot be pointed at an emulator (its endpoints, https://www.googleapis.com/storage/v1/
    and .../upload/storage/v1/, are compiled in; no variable overrides them), so these tests select epath's fsspec
    backend (`use_fsspec_for_gs`, and `LAUNCHER` for subprocesses); epath's tf.io.gfile backend is covered with a
    fake gfile (tests/test_cloud_paths.py).
  * google-cloud-storage (the workdir lock's lock.json on gs://): `STORAGE_EMULATOR_HOST`, anonymously.
  * `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`: gcsfs ≥ 2026 otherwise asks the storage-control gRPC API about each
    bucket (60 s timeouts against an emulator).

The emulator (gcp-storage-emulator 2026.7.19) lacks three things GCS does, which `_complete_the_emulator` adds:
objects.move, the generation headers of downloads, and request preconditions. The last follows GCS's documented
semantics (https://cloud.google.com/storage/docs/request-preconditions): `ifGenerationMatch=G` on an upload, a delete
or a read holds only if the object's live generation is G, and G = 0 means "no live object"; `ifGenerationNotMatch=G`
holds only if it is not G. An upload or delete whose precondition fails changes nothing and is answered 412; so is a
read of an existing object (a failed ifGenerationNotMatch on a read is 304, as GCS answers it); a read or delete of an
absent object stays 404. The check and the write run under one lock (the emulator's HTTP server answers one request
at a time today; the lock keeps check-and-write atomic should it ever answer several at once). Metageneration
preconditions are not implemented.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from http import HTTPStatus

BUCKET = "dtm-test-bucket"

# Runs a script (argv[1], then its arguments) with etils.epath's fsspec backend for gs:// (see the module docstring).
LAUNCHER = ("import sys, runpy; import etils.epath.gpath as g; g._is_tf_installed = lambda: False; "
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def use_fsspec_for_gs():
  """In this process: etils.epath sends gs:// to gcsfs (which the emulator serves), not to tf.io.gfile. Returns a
  function that undoes it."""
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top
  previous = gpath._is_tf_installed  # pylint: disable=protected-access
  gpath._is_tf_installed = lambda: False  # pylint: disable=protected-access

  def undo():
    gpath._is_tf_installed = previous  # pylint: disable=protected-access
  return undo


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


_precondition_lock = threading.RLock()  # reentrant: a handler may call another wrapped handler (get → download)


def _object_name(request, storage):
  """The object a request reads or writes: in the path, in the query (uploads), in the metadata of a multipart
  upload, or in a resumable upload's session."""
  if "upload_id" in request.query:
    return storage.get_resumable_file_obj(request.query["upload_id"][0])["name"]
  if request.params and "object_id" in request.params:
    return request.params["object_id"]
  if "name" in request.query:
    return request.query["name"][0]
  data = request.data if isinstance(request.data, dict) else {}
  return data.get("meta", data).get("name")


def _precondition_failure(request, storage, kind: str):
  """The status GCS answers when the generation precondition of a request of `kind` ("upload", "read", "delete")
  fails, or None when it holds (or there is none)."""
  match, not_match = (request.query.get(k, [None])[0] for k in ("ifGenerationMatch", "ifGenerationNotMatch"))
  if match is None and not_match is None:
    return None
  from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=g-import-not-at-top
  try:
    generation = int(storage.get_file_obj(request.params["bucket_name"], _object_name(request, storage))["generation"])
  except NotFound:
    if kind != "upload":
      return None  # reads and deletes of an absent object: the handler's 404
    generation = 0
  if match is not None and int(match) != generation:
    return HTTPStatus.PRECONDITION_FAILED
  if not_match is not None and int(not_match) == generation:
    return HTTPStatus.NOT_MODIFIED if kind == "read" else HTTPStatus.PRECONDITION_FAILED
  return None


def _honouring_preconditions(handler, kind: str):
  """`handler` that first checks the request's generation preconditions, under the lock that also holds its write."""

  def conditional(request, response, storage, *args, **kwargs):
    with _precondition_lock:
      failure = _precondition_failure(request, storage, kind)
      if failure is None:
        return handler(request, response, storage, *args, **kwargs)
      response.status = failure
      if failure == HTTPStatus.PRECONDITION_FAILED:
        message = "At least one of the pre-conditions you specified did not hold."
        response.json({"error": {"code": 412, "message": message, "errors": [
            {"domain": "global", "reason": "conditionNotMet", "message": message}]}})
  return conditional


def _complete_the_emulator() -> None:
  """Three things GCS does that the emulator lacks: objects.move (`POST …/o/SRC/moveTo/o/DST`, which gcsfs tries
  first for renames, retrying for ~30 s before copying), served as a copy and a delete; the generation headers of
  downloads (below); and generation preconditions on uploads, reads and deletes (the module docstring)."""
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  if getattr(server, "_dtm_move_to", False):
    return

  def move(request, response, storage, *args, **kwargs):
    del args, kwargs
    bucket, source, dest = (request.params[k] for k in ("bucket_name", "object_id", "dest_object_id"))
    try:
      moved = objects._copy(request.base_url, storage, bucket, source, bucket, dest)  # pylint: disable=protected-access
    except objects.NotFound:
      response.status = 404
      return
    objects._delete(storage, bucket, source)  # pylint: disable=protected-access
    response.json(moved)

  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    """GCS sends an object's generation with its bytes (x-goog-generation); TensorStore's conditional reads and
    writes (OCDBT manifests) need it, the emulator leaves it out."""
    download(request, response, storage, *args, **kwargs)
    if response.status in (200, 206):
      try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      except objects.NotFound:
        return
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))

  # Handlers the emulator's code also calls by name (objects.get → download, insert → upload_partial, the router's
  # uploads without /upload → insert) are replaced in the module too.
  replaced = {download: _honouring_preconditions(download_with_generation, "read")}
  for name, kind in (("get", "read"), ("delete", "delete"), ("insert", "upload"), ("upload_partial", "upload")):
    replaced[getattr(objects, name)] = _honouring_preconditions(getattr(objects, name), kind)
  for name in ("download", "get", "delete", "insert", "upload_partial"):
    setattr(objects, name, replaced[getattr(objects, name)])
  move_to = r"/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/(?P<dest_object_id>.*[^/]+)$"
  routes = tuple((rf"^{prefix}{move_to}", {"POST": move}) for prefix in (server.settings.API_ENDPOINT, ""))
  handlers = tuple((regex, {method: replaced.get(handler, handler) for method, handler in by_method.items()})
                   for regex, by_method in server.HANDLERS)
  server.HANDLERS = routes + handlers
  server._dtm_move_to = True  # pylint: disable=protected-access


class Emulator:
  """gcp-storage-emulator in a thread of this process, in memory, with one bucket."""

  def __init__(self):
    from gcp_storage_emulator.server import create_server  # pylint: disable=g-import-not-at-top
    logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)
    _complete_the_emulator()
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self._server = create_server("127.0.0.1", self.port, in_memory=True, default_bucket=BUCKET)
    self.env = {
        "STORAGE_EMULATOR_HOST": self.url,  # gcsfs (and google-cloud-storage)
        "TENSORSTORE_GCS_HTTP_URL": self.url,  # TensorStore's gcs kvstore driver
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # TensorStore: no Google credentials needed
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "NO_GCE_CHECK": "true",
        "FSSPEC_GS_TOKEN": "anon",  # gcsfs: no search for Google credentials (metadata-server timeouts)
    }

  def start(self) -> "Emulator":
    self._server.start()
    return self

  def stop(self) -> None:
    self._server.stop()

  def gcsfs(self):
    """A gcsfs filesystem on the emulator, for looking at what the code under test wrote."""
    import gcsfs  # pylint: disable=g-import-not-at-top
    return gcsfs.GCSFileSystem(endpoint_url=self.url, token="anon", skip_instance_cache=True)


def set_env(env: dict[str, str]) -> dict[str, str | None]:
  """Sets `env` in os.environ; returns the previous values (for restore_env)."""
  previous = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  return previous


def restore_env(previous: dict[str, str | None]) -> None:
  for k, v in previous.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
