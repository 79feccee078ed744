"""Certificates and keys for local servers, made with the `cryptography` package.

Why not openssl or kopf's self-signed path: openssl is a subprocess per file and may be absent on a
developer machine, and kopf's certbuilder/oscrypto path fails under OpenSSL 3 ("Error detecting the version
of libcrypto"). The same helpers serve the control plane and anyone who needs a serving certificate that
clients verify against our CA (e.g. the operator's admission webhook: SAN IP:127.0.0.1).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = dt.timedelta(days=365)


@dataclass(frozen=True)
class KeyPair:
    """A certificate (or public key) and its private key, as PEM files on disk."""

    cert_file: Path
    key_file: Path


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_key(key: rsa.RSAPrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def make_ca(directory: Path, name: str = "ca", common_name: str = "kubetune-local-ca") -> KeyPair:
    """A self-signed CA: `<name>.crt` / `<name>.key` in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    pair = KeyPair(directory / f"{name}.crt", directory / f"{name}.key")
    pair.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, pair.key_file)
    return pair


def issue_cert(
    ca: KeyPair,
    directory: Path,
    name: str,
    common_name: str,
    *,
    ips: Sequence[str] = ("127.0.0.1",),
    dns_names: Sequence[str] = ("localhost",),
    organizations: Sequence[str] = (),
    server: bool = True,
    client: bool = False,
) -> KeyPair:
    """A leaf certificate signed by `ca` with the given SANs (server and/or client usage)."""
    ca_key = serialization.load_pem_private_key(ca.key_file.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_file.read_bytes())
    key = _new_key()
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    attrs += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
        [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    )
    sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    sans += [x509.DNSName(d) for d in dns_names]
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]  # an EC/RSA CA key; stubs list every key type
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]  # our CA key is a signing key type
    pair = KeyPair(directory / f"{name}.crt", directory / f"{name}.key")
    pair.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, pair.key_file)
    return pair


def make_signing_key(directory: Path, name: str = "sa") -> KeyPair:
    """An RSA key pair for service-account tokens: `<name>.pub` (cert_file slot) and `<name>.key`."""
    key = _new_key()
    pair = KeyPair(directory / f"{name}.pub", directory / f"{name}.key")
    pair.cert_file.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    _write_key(key, pair.key_file)
    return pair
