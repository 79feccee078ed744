"""Certificates and keys made with `cryptography`: a CA, server certificates it signs, and the admission webhook's
serving certificate. The one implementation: the local control plane (kubetune_cli.localenv.pki) builds on it.

Why not kopf's own self-signed path (or openssl): kopf goes through certbuilder/oscrypto, which fails under
OpenSSL 3 ("Error detecting the version of libcrypto"); openssl is a subprocess per file and may be absent. The
API server verifies the webhook against the CA given in the ValidatingWebhookConfiguration (kopf puts `cafile`
there), so a certificate must carry the address its clients call as a SAN: an IP SAN for an IP host, a DNS SAN
otherwise. Keys are EC P-256: every client here (Go's TLS, the API server's token signer, Python's ssl) takes
them, and one is made in a millisecond where an RSA key takes a tenth of a second.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY_DAYS = 365
# Valid from a little before now: a client whose clock is slightly behind must not see a certificate "from
# the future".
_BACKDATE = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class Signed:
    """A certificate and its private key, in memory."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class ServingCert:
    certfile: Path
    pkeyfile: Path
    cafile: Path


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    """The private key as unencrypted PKCS#8 PEM, readable by its owner only."""
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


def write_public_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def write_signed(signed: Signed, cert_file: Path, key_file: Path | None = None) -> None:
    """The certificate as PEM to `cert_file`, and its key to `key_file` when given (a CA's key can stay in memory)."""
    cert_file.write_bytes(signed.cert.public_bytes(serialization.Encoding.PEM))
    if key_file is not None:
        write_key(signed.key, key_file)


def san(host: str) -> x509.GeneralName:
    """An IP SAN for an IP address, a DNS SAN otherwise."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, days: int
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        # OpenSSL's strict verification (Python 3.13's default context) wants key identifiers on both ends.
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def new_ca(common_name: str, days: int = VALIDITY_DAYS) -> Signed:
    """A self-signed CA that signs server certificates only (path length 0)."""
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    usage = x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=True,
        crl_sign=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )
    cert = (
        _builder(name, name, key, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .sign(key, hashes.SHA256())
    )
    return Signed(cert, key)


def new_server_cert(ca: Signed, hosts: Sequence[str], common_name: str = "", days: int = VALIDITY_DAYS) -> Signed:
    """A server certificate signed by `ca`, valid for every host given (IP or DNS SANs); its CN is `common_name`,
    else the first host."""
    if not hosts:
        raise ValueError("a server certificate needs at least one host")
    key = new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name or hosts[0])])
    cert = (
        _builder(subject, ca.cert.subject, key, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .add_extension(x509.SubjectAlternativeName([san(h) for h in dict.fromkeys(hosts)]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return Signed(cert, key)


def make_serving_cert(directory: Path, hosts: list[str], days: int = VALIDITY_DAYS) -> ServingCert:
    """Write ca.crt, tls.crt and tls.key into `directory`; the certificate is valid for every host given. The
    CA's key is never written: nothing signs with it again."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = new_ca("kubetune-webhook-ca", days)
    out = ServingCert(directory / "tls.crt", directory / "tls.key", directory / "ca.crt")
    write_signed(ca, out.cafile)
    write_signed(new_server_cert(ca, hosts, days=days), out.certfile, out.pkeyfile)
    return out


def existing_serving_cert(directory: Path) -> ServingCert | None:
    """tls.crt/tls.key/ca.crt in `directory` (a mounted Secret, e.g. from cert-manager), if all are there."""
    cert = ServingCert(directory / "tls.crt", directory / "tls.key", directory / "ca.crt")
    return cert if all(p.is_file() for p in (cert.certfile, cert.pkeyfile, cert.cafile)) else None
