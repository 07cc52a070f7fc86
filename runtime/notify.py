"""The request's webhook (`notify: {url, secret}`): when the job ends for good (completed, failed, cancelled) it
POSTs a JSON body signed with HMAC-SHA256, so that the receiver can tell the job's own calls from anyone's and
refuse a replayed one:

    X-Gemma-Timestamp: <unix seconds>
    X-Gemma-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>." + body, keyed with the secret>

A receiver recomputes the signature over the raw body and refuses a timestamp older than it allows (five
minutes, say). Delivery is retried with backoff (urllib3's Retry: connection errors, 429 and 5xx, three more
tries); what happened goes in the job document (`notify`). A webhook never costs the run: a failure to deliver
is a warning, and the job ends as it ended.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from typing import Any

logger = logging.getLogger(__name__)

TIMESTAMP, SIGNATURE = "X-Gemma-Timestamp", "X-Gemma-Signature"
RETRIES, BACKOFF_S, TIMEOUT_S = 3, 0.5, (5.0, 10.0)  # three retries after 0.5, 1 and 2 s; connect, read


def sign(secret: str, timestamp: int, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def post_event(url: str, secret: str, event: dict[str, Any]) -> dict[str, Any]:
    """POST the event, signed; never raises. Returns what the document records: delivered, the HTTP status or
    the error, and when."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    body = json.dumps(event, default=str, sort_keys=True).encode()
    timestamp = int(time.time())
    headers = {"Content-Type": "application/json", TIMESTAMP: str(timestamp), SIGNATURE: sign(secret, timestamp, body)}
    retry = Retry(total=RETRIES, backoff_factor=BACKOFF_S, status_forcelist=(429, 500, 502, 503, 504),
                  allowed_methods=None, raise_on_status=False)
    outcome: dict[str, Any] = {"event": event.get("status"), "url": url, "sent_at": timestamp}
    try:
        with requests.Session() as session:
            session.mount("http://", HTTPAdapter(max_retries=retry))
            session.mount("https://", HTTPAdapter(max_retries=retry))
            response = session.post(url, data=body, headers=headers, timeout=TIMEOUT_S, allow_redirects=False)
        outcome |= {"delivered": 200 <= response.status_code < 300, "status_code": response.status_code}
    except Exception as e:  # noqa: BLE001 - a webhook never costs the run
        outcome |= {"delivered": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    if not outcome["delivered"]:
        logger.warning("the webhook %s was not delivered: %s", url,
                       outcome.get("error") or f"HTTP {outcome.get('status_code')}")
    return outcome
