"""The request's webhook (runtime/notify.py): when the job ends for good it POSTs signed JSON, which a local HTTP
server here checks as a receiver would (HMAC-SHA256 over the timestamp and the raw body, with the secret);
delivery is retried through a server's errors; an unreachable receiver costs the job nothing; a URL that is not
https outside this machine, or a short secret, is refused with exit 2 before anything is loaded."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import main
from conftest import env_for, put_request, read_doc, sample_request

SECRET = "s3cret-for-the-webhook-test"


class Receiver:
    """A webhook receiver on 127.0.0.1 that answers the first `failures` calls with 503, then 200, and keeps
    every call's headers and body."""

    def __init__(self, failures: int = 0):
        self.calls: list[tuple[dict[str, str], bytes]] = []
        self.failures = failures
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.calls.append((dict(self.headers), body))
                self.send_response(503 if len(receiver.calls) <= receiver.failures else 200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/gemma"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def verified(self, headers: dict[str, str], body: bytes) -> dict:
        """The body, once its signature checks out as a receiver checks it; raises otherwise."""
        timestamp = headers["X-Gemma-Timestamp"]
        expected = "sha256=" + hmac.new(SECRET.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["X-Gemma-Signature"], expected), "signature does not verify"
        return json.loads(body)


@pytest.fixture
def receiver():
    found = Receiver(failures=2)
    yield found
    found.server.shutdown()


def test_a_completed_job_calls_its_webhook_signed_through_two_server_errors(local_dir, tiny_root, receiver):
    req = sample_request(tiny_root)
    req["training_config"]["hyperparameters"].update(max_steps=2, epochs=1)
    req["training_config"]["eval_config"] = {"eval_strategy": "no"}
    req["notify"] = {"url": receiver.url, "secret": SECRET}
    put_request(local_dir, "hooked", req)
    assert main.main([], env_for(local_dir, "hooked")) == 0
    assert len(receiver.calls) == 3  # two 503s retried, then delivered
    bodies = [receiver.verified(*call) for call in receiver.calls]
    assert all(b == bodies[0] for b in bodies)  # the same signed event each time
    event = bodies[0]
    assert event["job_id"] == "hooked" and event["status"] == "completed" and event["error"] is None
    assert event["adapter_path"] == "gs://gemma-export-bucket/trained_adapters/hooked/"
    tampered = receiver.calls[0][1].replace(b"completed", b"failed!!!")
    with pytest.raises(AssertionError, match="signature"):
        receiver.verified(receiver.calls[0][0], tampered)
    doc = read_doc(local_dir, "hooked")
    assert doc["status"] == "completed" and doc["notify"]["delivered"] is True and doc["notify"]["status_code"] == 200
    # the secret is gone from the request object once the job is over, and from the document and the log
    scrubbed = json.loads((local_dir / "gemma-train-config" / "hooked.json").read_text())
    assert scrubbed["notify"] == {"url": receiver.url} and SECRET not in json.dumps(doc)


def test_a_failed_job_calls_its_webhook_and_an_unreachable_one_costs_nothing(local_dir, tiny_root):
    """A job refused at pre-flight (its dataset is not there): the webhook hears `failed` with the error; the
    same with nobody listening ends exactly as it would without a webhook (exit 2, the same error), with the
    undelivered call recorded."""
    found = Receiver()
    try:
        req = sample_request(tiny_root)
        req["processed_dataset_id"] = "no-such-dataset"
        req["notify"] = {"url": found.url, "secret": SECRET}
        put_request(local_dir, "hooked-fail", req)
        assert main.main([], env_for(local_dir, "hooked-fail")) == 2
        event = found.verified(*found.calls[0])
        doc = read_doc(local_dir, "hooked-fail")
        assert len(found.calls) == 1 and event["status"] == "failed" and event["error"] == doc["error"]
    finally:
        found.server.shutdown()
        found.server.server_close()
    put_request(local_dir, "hooked-nobody", req | {"notify": {"url": found.url, "secret": SECRET}})
    assert main.main([], env_for(local_dir, "hooked-nobody")) == 2
    doc = read_doc(local_dir, "hooked-nobody")
    assert doc["error"] == read_doc(local_dir, "hooked-fail")["error"] and doc["error_type"] == "permanent"
    assert doc["notify"]["delivered"] is False and "Connection" in doc["notify"]["error"]


@pytest.mark.parametrize("notify,field", [({"url": "http://hooks.example.com/gemma", "secret": SECRET}, "notify.url"),
                                          ({"url": "https://hooks.example.com/gemma", "secret": "short"},
                                           "notify.secret"),
                                          ({"url": "ftp://hooks.example.com/x", "secret": SECRET}, "notify.url")])
def test_bad_webhooks_are_refused_with_exit_2_naming_the_field(notify, field, local_dir, tiny_root):
    req = sample_request(tiny_root) | {"notify": notify}
    put_request(local_dir, "bad-hook", req)
    assert main.main([], env_for(local_dir, "bad-hook")) == 2
    doc = read_doc(local_dir, "bad-hook")
    assert doc["status"] == "failed" and field in doc["error"] and "notify" not in doc
