"""The autoscaler's RSA key: route answers are signed with it, workers verify with its PEM.

Vast uses RSA PKCS#1 v1.5 over SHA-256 with a base64 signature (protocol spec 2.3).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa


@dataclass(frozen=True)
class SigningKey:
    private_key: rsa.RSAPrivateKey

    @classmethod
    def generate(cls, bits: int = 2048) -> SigningKey:
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=bits))

    def sign(self, message: bytes) -> str:
        raw = self.private_key.sign(message, padding.PKCS1v15(), hashes.SHA256())
        return base64.b64encode(raw).decode("ascii")

    def public_pem(self) -> str:
        return public_pem(self.private_key.public_key())


def public_pem(key: rsa.RSAPublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def load_public_key(pem: str) -> rsa.RSAPublicKey:
    key = serialization.load_pem_public_key(pem.encode("ascii"))
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("the autoscaler's public key is not an RSA key")
    return key


def verify(public_key: rsa.RSAPublicKey, message: bytes, signature: object) -> bool:
    """True only for a well-formed base64 signature of exactly `message`."""
    if not isinstance(signature, str):
        return False
    try:
        raw = base64.b64decode(signature, validate=True)
        public_key.verify(raw, message, padding.PKCS1v15(), hashes.SHA256())
    except (binascii.Error, ValueError, InvalidSignature):
        return False
    return True
