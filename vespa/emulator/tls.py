"""Certificates for HTTPS workers: a root CA shaped like Vast's, and worker certs it signs.

Vast's root (`{console}/static/jvastai_root.cer`, "Vast.ai Jupyter CA", issued 2022) has
basicConstraints CA:TRUE with pathlen:0, a nameConstraints extension that permits IPv4 addresses,
and no keyUsage extension at all. OpenSSL's default verification accepts it; Python 3.13's
default context adds VERIFY_X509_STRICT, which rejects it ("Path length given without key usage
keyCertSign"). That is why the official SDK clears the flag. The emulator's CA copies that shape
so a client that only works with a lenient CA, or only with a strict one, fails here as it would
on Vast. (A CA whose keyUsage is present but lacks keyCertSign is not the quirk: OpenSSL rejects
that even without strict mode, as "invalid CA certificate".)

EC P-256 keys keep generation to milliseconds, so every emulator start gets fresh ones.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import tempfile
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_FOR = datetime.timedelta(days=30)
# A client clock a little behind ours must not see a certificate from the future.
BACKDATE = datetime.timedelta(hours=1)


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Vespa emulator"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


@dataclass(frozen=True)
class CertAuthority:
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    cert: x509.Certificate

    @classmethod
    def generate(cls, common_name: str = "Vespa emulator Jupyter CA", *, vast_quirk: bool = True) -> CertAuthority:
        """`vast_quirk` copies Vast's shape (no keyUsage); without it, a textbook CA (keyCertSign set)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + VALID_FOR)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.NameConstraints(
                    permitted_subtrees=[x509.IPAddress(ipaddress.ip_network("0.0.0.0/0"))], excluded_subtrees=None
                ),
                critical=True,
            )
        )
        if not vast_quirk:
            builder = builder.add_extension(
                x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )  # fmt: skip
        return cls(key, builder.sign(key, hashes.SHA256()))

    def pem(self) -> bytes:
        """The CA as the console serves it: one PEM block."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, ip: str) -> tuple[bytes, bytes]:
        """A worker certificate for `ip` (an IP SAN, as Vast's instance.crt has): (cert PEM, key PEM)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(ip))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + VALID_FOR)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem

    def server_context(self, ip: str) -> ssl.SSLContext:
        """A TLS server context presenting a fresh certificate for `ip` signed by this CA."""
        cert_pem, key_pem = self.issue(ip)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        # load_cert_chain only reads files; they live just long enough to be read.
        with tempfile.TemporaryDirectory(prefix="vespa-emu-tls-") as tmp:
            cert_path, key_path = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
            with open(cert_path, "wb") as f:
                f.write(cert_pem)
            with os.fdopen(os.open(key_path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
                f.write(key_pem)
            context.load_cert_chain(cert_path, key_path)
        return context
