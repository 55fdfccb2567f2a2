"""A tiny S3 front that checks presigned URLs as AWS S3 and MinIO do, for tests.

moto (the tests' S3) does not check presigned URLs at all: moto 5.2.5 stores a PUT whose signature
was altered, whose key was changed or whose expiry passed (tests/integration/test_transfers.py shows
it). This gateway stands where clients reach the store (FLUXLORA_S3_PUBLIC_ENDPOINT): it recomputes
each query-string SigV4 signature with botocore's signer (an implementation independent of the minio
client that signed it) over the method, path, query and Host, refuses a mismatch or an expired URL
with 403 as S3 does, and forwards what passes to moto. Requests without a presigned signature are
refused too: clients hold no credentials. `clock` moves its notion of now (expiry tests without
sleeping); `forwarded` records each (method, path) that reached the store.
"""

from __future__ import annotations

import datetime
import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from botocore.auth import S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

SIGV4_TIME = "%Y%m%dT%H%M%SZ"


def check_presigned(method: str, url: str, host: str, secrets: dict[str, str], now: datetime.datetime) -> str:
    """Why S3 would refuse this presigned request ('' when it would accept it)."""
    query = parse_qsl(urlsplit(url).query, keep_blank_values=True)
    params = dict(query)
    if params.get("X-Amz-Algorithm") != "AWS4-HMAC-SHA256" or "X-Amz-Signature" not in params:
        return "AccessDenied: not a SigV4 presigned request"
    try:
        access_key, _day, region, service, _ = params["X-Amz-Credential"].split("/")
        signed_at = datetime.datetime.strptime(params["X-Amz-Date"], SIGV4_TIME).replace(tzinfo=datetime.UTC)
        expires = int(params["X-Amz-Expires"])
    except (KeyError, ValueError):
        return "AuthorizationQueryParametersError: malformed X-Amz-* parameters"
    if access_key not in secrets:
        return "InvalidAccessKeyId"
    if params.get("X-Amz-SignedHeaders") != "host":
        return "AccessDenied: only host may be signed here"
    unsigned = urlencode([(k, v) for k, v in query if k != "X-Amz-Signature"], quote_via=quote)
    request = AWSRequest(method=method, url=f"http://{host}{urlsplit(url).path}?{unsigned}", headers={"host": host})
    request.context["timestamp"] = params["X-Amz-Date"]
    auth = S3SigV4QueryAuth(Credentials(access_key, secrets[access_key]), service, region, expires=expires)
    expected = auth.signature(auth.string_to_sign(request, auth.canonical_request(request)), request)
    if expected != params["X-Amz-Signature"]:
        return "SignatureDoesNotMatch"
    if now > signed_at + datetime.timedelta(seconds=expires):
        return "AccessDenied: Request has expired"
    return ""


class SigV4Gateway:
    def __init__(self, upstream: str, secrets: dict[str, str]):
        self.upstream = upstream
        self.secrets = secrets
        self.offset = datetime.timedelta()
        self.forwarded: list[tuple[str, str]] = []
        self.refused: list[tuple[str, str, str]] = []
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                now = datetime.datetime.now(datetime.UTC) + gateway.offset
                problem = check_presigned(self.command, self.path, self.headers.get("Host", ""), gateway.secrets, now)
                path = urlsplit(self.path).path
                if problem:
                    gateway.refused.append((self.command, path, problem))
                    payload = f"<Error><Code>{problem.split(':')[0]}</Code><Message>{problem}</Message></Error>"
                    self._reply(403, {"Content-Type": "application/xml"}, payload.encode())
                    return
                gateway.forwarded.append((self.command, path))
                conn = http.client.HTTPConnection(gateway.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "content-length")}
                conn.request(self.command, self.path, body=body if self.command == "PUT" else None, headers=headers)
                response = conn.getresponse()
                data = response.read()
                keep = {k: v for k, v in response.getheaders() if k.lower() in ("content-type", "etag")}
                conn.close()
                self._reply(response.status, keep, data)

            def _reply(self, status: int, headers: dict[str, str], data: bytes) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> SigV4Gateway:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
