"""The deployment PKI: CA, coordinator TLS certificate, site keys, `certs`/`keys` CLI."""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import json
import os
import shutil
import socket
import ssl
import stat
import threading
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import typer
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    load_ssh_private_key,
    load_ssh_public_key,
)
from cryptography.x509.oid import ExtendedKeyUsageOID
from typer.testing import CliRunner

from wardround.common.errors import ConfigError
from wardround.deploy.cli import certs_app, keys_app
from wardround.pki import (
    describe_certificate,
    expiry_warning,
    generate_site_keypair,
    init_ca,
    issue_server_certificate,
    load_ca,
    public_key_fingerprint,
    verify_issued_by,
)

runner = CliRunner()
HOSTS = ["localhost", "coordinator.example.org"]
IPS = ["127.0.0.1", "::1"]


def _app() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(certs_app, name="certs")
    app.add_typer(keys_app, name="keys")
    return app


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA, a coordinator certificate it signed, and an unrelated CA (same CN)."""
    root = tmp_path_factory.mktemp("pki")
    ca = init_ca(root / "ca")
    server = issue_server_certificate(root / "ca", HOSTS, IPS, root / "server")
    other = init_ca(root / "other-ca")
    return {
        "ca_dir": root / "ca",
        "ca": ca.cert,
        "ca_key": ca.key,
        "server": server.cert,
        "server_key": server.key,
        "other_ca": other.cert,
    }


# ------------------------------------------------------------------------ the CA


def test_ca_is_a_self_signed_ca_with_private_key(pki):
    cert = _cert(pki["ca"])
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert cert.subject == cert.issuer
    assert verify_issued_by(pki["ca"], pki["ca"])
    assert not verify_issued_by(pki["ca"], pki["other_ca"])
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp384r1"
    assert _mode(pki["ca_key"]) == 0o600
    assert b"BEGIN PRIVATE KEY" in pki["ca_key"].read_bytes()  # PKCS#8, unencrypted


def test_key_file_is_private_even_with_a_permissive_umask(tmp_path):
    previous = os.umask(0)
    try:
        files = init_ca(tmp_path)
    finally:
        os.umask(previous)
    assert _mode(files.key) == 0o600
    assert _mode(files.cert) == 0o644


def test_init_refuses_to_overwrite_without_force(tmp_path):
    files = init_ca(tmp_path)
    before = files.cert.read_bytes(), files.key.read_bytes()
    with pytest.raises(ConfigError) as info:
        init_ca(tmp_path)
    assert str(files.cert) in str(info.value) and "--force" in str(info.value)
    assert (files.cert.read_bytes(), files.key.read_bytes()) == before

    # A key file someone widened is replaced by a fresh 0600 one.
    files.key.chmod(0o644)
    init_ca(tmp_path, force=True)
    assert files.cert.read_bytes() != before[0]
    assert _mode(files.key) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.key", "ca.pem"]


def test_server_issue_refuses_a_ca_key_that_does_not_match(tmp_path, pki):
    shutil.copy(pki["ca"], tmp_path / "ca.pem")
    foreign = init_ca(tmp_path / "foreign")
    shutil.copy(foreign.key, tmp_path / "ca.key")
    with pytest.raises(ConfigError, match="does not belong"):
        load_ca(tmp_path)
    with pytest.raises(ConfigError, match="certs init"):
        issue_server_certificate(tmp_path / "missing", ["localhost"], [], tmp_path)


# ------------------------------------------------------------ the server cert


def test_server_cert_is_signed_by_its_ca_only(pki):
    assert verify_issued_by(pki["server"], pki["ca"])
    # Same CN "wardround CA", different key: the signature must not verify.
    assert not verify_issued_by(pki["server"], pki["other_ca"])
    assert not verify_issued_by(pki["ca"], pki["server"])


def test_server_cert_names_exactly_what_was_asked(pki):
    cert = _cert(pki["server"])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == HOSTS
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == IPS
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = _cert(pki["ca"]).extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert aki.key_identifier == ski.value.digest
    assert _mode(pki["server_key"]) == 0o600
    assert sorted(p.name for p in pki["server"].parent.iterdir()) == [
        "coordinator.key",
        "coordinator.pem",
    ]


@pytest.mark.parametrize(
    ("hosts", "ips", "named"),
    [
        (["localhost"], ["999.1.1.1"], "'999.1.1.1'"),
        (["localhost"], ["localhost"], "'localhost'"),
        ([], ["127.0.0.1"], "at least one host"),
        (["bad host"], [], "'bad host'"),
        (["127.0.0.1"], [], "--ip 127.0.0.1"),
    ],
)
def test_server_issue_rejects_bad_names(pki, tmp_path, hosts, ips, named):
    with pytest.raises(ConfigError) as info:
        issue_server_certificate(pki["ca_dir"], hosts, ips, tmp_path / "out")
    assert named in str(info.value)
    assert not (tmp_path / "out").exists()


def test_server_issue_will_not_replace_the_ca_files(pki, tmp_path):
    ca_dir = tmp_path / "ca"
    shutil.copytree(pki["ca_dir"], ca_dir)
    with pytest.raises(ConfigError, match="CA's own files"):
        issue_server_certificate(ca_dir, ["x"], [], ca_dir, name="ca", force=True)
    assert (ca_dir / "ca.pem").read_bytes() == pki["ca"].read_bytes()


def _tls_handshake(
    pki: dict[str, Path], cafile: Path, server_hostname: str
) -> dict[str, object]:
    """Serve the coordinator certificate on 127.0.0.1 and connect trusting ``cafile``."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(pki["server"], pki["server_key"])
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        port = listener.getsockname()[1]

        def serve() -> None:
            try:
                connection, _ = listener.accept()
                with server_context.wrap_socket(connection, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (OSError, ssl.SSLError):
                pass  # the client refused us; the client side asserts why

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            client_context = ssl.create_default_context(cafile=str(cafile))
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with client_context.wrap_socket(
                    raw, server_hostname=server_hostname
                ) as tls:
                    assert tls.recv(2) == b"ok"
                    return tls.getpeercert()
        finally:
            thread.join(10)


@pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1"])
def test_tls_handshake_succeeds_with_the_ca(pki, server_hostname):
    peer = _tls_handshake(pki, pki["ca"], server_hostname)
    assert ("DNS", "localhost") in peer["subjectAltName"]


def test_tls_handshake_fails_with_another_ca(pki):
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_handshake(pki, pki["other_ca"], "localhost")


def test_tls_handshake_fails_for_a_name_not_in_the_certificate(pki):
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_handshake(pki, pki["ca"], "elsewhere.example.org")


def _grpc_connects(pki: dict[str, Path], root: Path, timeout: float) -> bool:
    """Whether a gRPC channel trusting ``root`` gets through TLS to the server."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    credentials = grpc.ssl_server_credentials(
        [(pki["server_key"].read_bytes(), pki["server"].read_bytes())]
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    channel = grpc.secure_channel(
        f"127.0.0.1:{port}", grpc.ssl_channel_credentials(root.read_bytes())
    )
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        return True
    except grpc.FutureTimeoutError:
        return False
    finally:
        channel.close()
        server.stop(None)


def test_grpc_tls_as_flower_uses_it(pki):
    # SuperLink: --ssl-certfile/--ssl-keyfile; SuperNode: --root-certificates ca.pem.
    assert _grpc_connects(pki, pki["ca"], timeout=10)
    assert not _grpc_connects(pki, pki["other_ca"], timeout=2)


# ------------------------------------------------------------------ describe


def test_describe_counts_days_from_an_injected_now(tmp_path):
    issued = dt.datetime(2030, 1, 1, 12, tzinfo=dt.UTC)
    init_ca(tmp_path / "ca", now=issued)
    files = issue_server_certificate(
        tmp_path / "ca", ["localhost"], ["127.0.0.1"], tmp_path, days=825, now=issued
    )
    info = describe_certificate(files.cert, now=issued + dt.timedelta(days=800))
    assert info.days_left == 25
    assert info.not_after == issued + dt.timedelta(days=825)
    assert info.not_after.tzinfo is not None and info.not_before < issued
    assert info.subject_cn == "localhost" and info.issuer_cn == "wardround CA"
    assert not info.is_ca
    assert info.dns_names == ("localhost",) and info.ip_addresses == ("127.0.0.1",)
    assert info.key_type == "EC secp384r1"
    expected = hashlib.sha256(_cert(files.cert).public_bytes(Encoding.DER)).hexdigest()
    assert info.sha256_fingerprint == expected
    assert expiry_warning(info) is not None and "25 day" in expiry_warning(info)
    assert expiry_warning(describe_certificate(files.cert, now=issued)) is None

    expired = describe_certificate(files.cert, now=issued + dt.timedelta(days=826))
    assert expired.days_left < 0 and "expired" in expiry_warning(expired)
    with pytest.raises(ConfigError, match="timezone-aware"):
        describe_certificate(files.cert, now=dt.datetime(2030, 1, 1))


def test_describe_rejects_what_is_not_a_certificate(tmp_path, pki):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        describe_certificate(notes)
    with pytest.raises(ConfigError, match="is a key, not a certificate"):
        describe_certificate(pki["server_key"])
    with pytest.raises(ConfigError, match="not found"):
        describe_certificate(tmp_path / "absent.pem")


# ------------------------------------------------------------------ site keys


def test_site_keys_are_a_matching_openssh_pair(tmp_path):
    files = generate_site_keypair("st-marys_2", tmp_path)
    assert _mode(files.private_key) == 0o600
    private = load_ssh_private_key(files.private_key.read_bytes(), password=None)
    public = load_ssh_public_key(files.public_key.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.curve.name == "secp384r1"
    assert public == private.public_key()
    assert files.public_key.read_text().split()[2] == "st-marys_2"

    message = b"wardround round 7"
    signature = private.sign(message, ec.ECDSA(hashes.SHA256()))
    public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    other = generate_site_keypair("other", tmp_path)
    other_public = load_ssh_public_key(other.public_key.read_bytes())
    with pytest.raises(InvalidSignature):
        other_public.verify(signature, message, ec.ECDSA(hashes.SHA256()))

    blob = base64.b64decode(files.public_key.read_text().split()[1])
    assert public_key_fingerprint(files.public_key) == hashlib.sha256(blob).hexdigest()
    assert public_key_fingerprint(other.public_key) != public_key_fingerprint(
        files.public_key
    )
    with pytest.raises(ConfigError, match="already exists"):
        generate_site_keypair("other", tmp_path)


def test_flower_accepts_the_site_keys(tmp_path):
    from wardround.flower_compat.tools import (
        try_load_public_key,
        try_setup_client_authentication,
    )

    files = generate_site_keypair("site-a", tmp_path)
    assert try_load_public_key(files.public_key)
    args = argparse.Namespace(
        auth_supernode_private_key=str(files.private_key),
        auth_supernode_public_key=None,
    )
    private, public = try_setup_client_authentication(args)
    assert public == load_ssh_public_key(files.public_key.read_bytes())


@pytest.mark.parametrize("name", ["", "bad name", "../etc", "x" * 65, "hôpital"])
def test_bad_site_names_are_refused(tmp_path, name):
    with pytest.raises(ConfigError) as info:
        generate_site_keypair(name, tmp_path)
    assert repr(name) in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_fingerprint_rejects_a_non_key(tmp_path):
    path = tmp_path / "x.pub"
    path.write_text("ssh-ed25519 !!!notbase64 site\n")
    with pytest.raises(ConfigError, match="not an OpenSSH public key"):
        public_key_fingerprint(path)


# ------------------------------------------------------------------------ CLI


def test_cli_init_server_show(tmp_path):
    app = _app()
    ca_dir, out = tmp_path / "ca", tmp_path / "tls"
    result = runner.invoke(app, ["certs", "init", "--out", str(ca_dir)])
    assert result.exit_code == 0, result.output
    assert f"wrote {ca_dir / 'ca.key'} (mode 0600)" in result.output

    result = runner.invoke(app, ["certs", "init", "--out", str(ca_dir)])
    assert result.exit_code == 2
    assert "already exists" in result.output and "--force" in result.output
    result = runner.invoke(app, ["certs", "init", "--out", str(ca_dir), "--force"])
    assert result.exit_code == 0, result.output

    args = ["certs", "server", "--ca", str(ca_dir), "--out", str(out)]
    args += ["--host", "localhost", "--host", "fl.example.org", "--ip", "127.0.0.1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"wrote {out / 'coordinator.key'} (mode 0600)" in result.output
    assert "certificate = " in result.output and "root-certificate = " in result.output
    assert "--ssl-certfile" not in result.output  # the config keys, not Flower's flags
    assert "warning" not in result.output
    assert verify_issued_by(out / "coordinator.pem", ca_dir / "ca.pem")

    pems = [str(ca_dir / "ca.pem"), str(out / "coordinator.pem")]
    result = runner.invoke(app, ["certs", "show", *pems])
    assert result.exit_code == 0, result.output
    assert "localhost, fl.example.org" in result.output and "127.0.0.1" in result.output
    assert "WARNING" not in result.output

    result = runner.invoke(app, ["certs", "show", "--json", *pems])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert [item["is_ca"] for item in listed] == [True, False]
    assert listed[1]["dns_names"] == ["localhost", "fl.example.org"]
    assert listed[1]["warning"] is None


def test_cli_show_warns_about_a_certificate_close_to_expiry(pki, tmp_path):
    app = _app()
    args = ["certs", "server", "--ca", str(pki["ca_dir"]), "--out", str(tmp_path)]
    result = runner.invoke(app, [*args, "--host", "localhost", "--days", "10"])
    assert result.exit_code == 0, result.output
    # without --ip 127.0.0.1 the coordinator would refuse it: said at once
    assert (
        "does not name 127.0.0.1" in result.output and "--ip 127.0.0.1" in result.output
    )
    result = runner.invoke(app, ["certs", "show", str(tmp_path / "coordinator.pem")])
    assert result.exit_code == 0, result.output
    assert "WARNING" in result.output and "expires in" in result.output
    result = runner.invoke(
        app, ["certs", "show", "--json", str(tmp_path / "coordinator.pem")]
    )
    assert "expires in" in json.loads(result.output)[0]["warning"]


def test_cli_keys_site_prints_files_and_next_step(tmp_path):
    result = runner.invoke(_app(), ["keys", "site", "st-marys", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert f"wrote {tmp_path / 'st-marys.key'} (mode 0600)" in result.output
    assert (
        f"wardround sites add st-marys --key {tmp_path / 'st-marys.pub'} "
        "--config coordinator.toml"
    ) in result.output


def test_cli_bad_inputs_exit_2_naming_the_problem(pki, tmp_path):
    app = _app()
    result = runner.invoke(
        app,
        ["certs", "server", "--ca", str(pki["ca_dir"]), "--out", str(tmp_path),
         "--host", "localhost", "--ip", "127.0.0.300"],
    )  # fmt: skip
    assert result.exit_code == 2 and "'127.0.0.300'" in result.output

    result = runner.invoke(
        app, ["certs", "server", "--ca", str(pki["ca_dir"]), "--out", str(tmp_path)]
    )
    assert result.exit_code == 2 and "at least one host" in result.output

    result = runner.invoke(app, ["keys", "site", "no/slashes", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "'no/slashes'" in result.output

    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"\x00\x01 not pem")
    result = runner.invoke(app, ["certs", "show", str(pki["ca"]), str(junk)])
    assert result.exit_code == 2
    assert "not a PEM certificate" in result.output and "junk.pem" in result.output
    assert list(tmp_path.iterdir()) == [junk]


def test_a_validity_past_the_year_9999_is_a_config_error_not_an_overflow():
    from wardround.common.errors import ConfigError
    from wardround.pki.names import validate_days

    assert validate_days(3650) == 3650
    with pytest.raises(ConfigError, match="ends after the year 9999"):
        validate_days(100_000_000)


def test_a_server_certificate_may_not_outlive_its_ca(tmp_path):
    issued = dt.datetime(2030, 1, 1, 12, tzinfo=dt.UTC)
    init_ca(tmp_path / "ca", days=30, now=issued)
    with pytest.raises(ConfigError) as err:
        issue_server_certificate(
            tmp_path / "ca", ["localhost"], [], tmp_path / "a", days=825, now=issued
        )
    assert "--days 825 would keep the certificate valid after its CA expires" in (
        err.value.message
    )
    assert "(2030-01-31)" in err.value.message
    assert "--days 30 or fewer" in err.value.hint
    assert not (tmp_path / "a").exists()
    files = issue_server_certificate(
        tmp_path / "ca", ["localhost"], [], tmp_path / "b", days=30, now=issued
    )
    assert describe_certificate(files.cert, now=issued).days_left == 30
    with pytest.raises(ConfigError, match="the CA expired on 2030-01-31"):
        issue_server_certificate(
            tmp_path / "ca",
            ["localhost"],
            [],
            tmp_path / "c",
            days=1,
            now=issued + dt.timedelta(days=31),
        )
