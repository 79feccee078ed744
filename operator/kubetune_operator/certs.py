"""A CA and a serving certificate for the admission webhook, made with `cryptography`.

Why not kopf's own self-signed path: it goes through certbuilder/oscrypto, which fails under OpenSSL 3
("Error detecting the version of libcrypto"). The API server verifies the webhook against the CA given in the
ValidatingWebhookConfiguration (kopf puts `cafile` there), so the certificate must carry the address the API
server calls as a SAN: an IP SAN for an IP host, a DNS SAN otherwise.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class ServingCert:
    certfile: Path
    pkeyfile: Path
    cafile: Path


def _pem_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_serving_cert(directory: Path, hosts: list[str], days: int = 365) -> ServingCert:
    """Write ca.crt, tls.crt and tls.key into `directory`; the certificate is valid for every host given."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubetune-webhook-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in dict.fromkeys(hosts)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out = ServingCert(directory / "tls.crt", directory / "tls.key", directory / "ca.crt")
    out.cafile.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out.certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _pem_key(key, out.pkeyfile)
    return out


def existing_serving_cert(directory: Path) -> ServingCert | None:
    """tls.crt/tls.key/ca.crt in `directory` (a mounted Secret, e.g. from cert-manager), if all are there."""
    cert = ServingCert(directory / "tls.crt", directory / "tls.key", directory / "ca.crt")
    return cert if all(p.is_file() for p in (cert.certfile, cert.pkeyfile, cert.cafile)) else None
