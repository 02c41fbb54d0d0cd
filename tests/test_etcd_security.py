"""The etcd store against an etcd with user/password auth, and one with TLS and client certificates."""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import StoreUnavailable
from gateway.state import AuditDraft, open_store
from gateway.state.etcd import EtcdStore
from gateway.state.etcd_client import encode, prefix_end
from testkit.etcd import EtcdServer

PREFIX = "/secure"


def draft(before: int = 0) -> AuditDraft:
    return AuditDraft(1.0, "oncall", "set-traffic", "ctr-ranker", "why", False, before)


@pytest.fixture
def auth_etcd(own_etcd: EtcdServer) -> EtcdServer:
    """root (root role) and `gw`, who may read and write only under /secure; auth on."""
    steps: list[tuple[str, dict[str, Any]]] = [
        ("/v3/auth/role/add", {"name": "root"}),
        ("/v3/auth/user/add", {"name": "root", "password": "rootpw"}),
        ("/v3/auth/user/grant", {"user": "root", "role": "root"}),
        ("/v3/auth/role/add", {"name": "gateway"}),
        (
            "/v3/auth/role/grant",
            {
                "name": "gateway",
                "perm": {"permType": "READWRITE", "key": encode(PREFIX), "range_end": encode(prefix_end(PREFIX))},
            },
        ),
        ("/v3/auth/user/add", {"name": "gw", "password": "gwpw"}),
        ("/v3/auth/user/grant", {"user": "gw", "role": "gateway"}),
        ("/v3/auth/enable", {}),
    ]
    for path, body in steps:
        own_etcd.call(path, body)
    return own_etcd


def test_user_and_password_from_the_environment(auth_etcd: EtcdServer) -> None:
    url = f"etcd://{auth_etcd.endpoint}{PREFIX}"
    store = open_store(url, {"GATEWAY_ETCD_USER": "gw", "GATEWAY_ETCD_PASSWORD": "gwpw"})
    assert isinstance(store, EtcdStore)
    store.commit(0, "{}", draft())
    store._client._token = "expired-token"  # etcd expires tokens: the client authenticates again
    assert [r.revision for r in store.wait_for_change(0, 5, threading.Event())] == [1]
    store._client._token = "expired-token"
    store.commit(1, "{}", draft(1))
    assert store.latest() is not None and store.latest().revision == 2  # type: ignore[union-attr]
    store.close()

    wrong = open_store(url, {"GATEWAY_ETCD_USER": "gw", "GATEWAY_ETCD_PASSWORD": "nope"})
    with pytest.raises(StoreUnavailable, match=rf"the state store {url} refused user 'gw'"):
        wrong.latest()
    anonymous = open_store(url, {})
    with pytest.raises(StoreUnavailable, match="refused the call"):
        anonymous.latest()
    outside = open_store(
        f"etcd://{auth_etcd.endpoint}/elsewhere", {"GATEWAY_ETCD_USER": "gw", "GATEWAY_ETCD_PASSWORD": "gwpw"}
    )
    with pytest.raises(StoreUnavailable, match="permission denied"):
        outside.commit(0, "{}", draft())
    for store in (wrong, anonymous, outside):
        store.close()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def certificates(tmp_path: Path) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (it makes the test certificates)")
    pki = tmp_path / "pki"
    pki.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-keyout", "ca-key.pem", "-out", "ca.pem", cwd=pki)  # fmt: skip
    # etcd's own JSON gateway dials etcd's gRPC port with the server certificate, so under
    # --client-cert-auth that certificate must also be good for client auth.
    (pki / "server.ext").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
    (pki / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, subject in (("server", "/CN=127.0.0.1"), ("client", "/CN=gateway")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", f"{name}-key.pem",
                 "-out", f"{name}.csr", cwd=pki)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
                 "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=pki)  # fmt: skip
    return pki


def test_tls_with_a_client_certificate(certificates: Path, tmp_path: Path) -> None:
    pki = certificates
    server = EtcdServer(
        tmp_path / "tls-data",
        "--cert-file", str(pki / "server.pem"), "--key-file", str(pki / "server-key.pem"),
        "--client-cert-auth", "--trusted-ca-file", str(pki / "ca.pem"),
        tls_client=(pki / "ca.pem", pki / "client.pem", pki / "client-key.pem"),
    ).start()  # fmt: skip
    try:
        base = f"etcds://{server.endpoint}/tls"
        url = f"{base}?cacert={pki / 'ca.pem'}&cert={pki / 'client.pem'}&key={pki / 'client-key.pem'}"
        store = open_store(url, {})
        assert store.url == base  # file paths stay out of messages
        store.commit(0, "{}", draft())
        assert [r.revision for r in store.wait_for_change(0, 5, threading.Event())] == [1]
        store.close()
        without_certificate = open_store(f"{base}?cacert={pki / 'ca.pem'}", {})
        with pytest.raises(StoreUnavailable, match=f"the state store {base}"):
            without_certificate.latest()
        untrusted = open_store(base, {})  # the system trust store does not know the test CA
        with pytest.raises(StoreUnavailable, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            untrusted.latest()
        for other in (without_certificate, untrusted):
            other.close()
    finally:
        server.kill()
