"""A throwaway C2PA signing identity (root CA + ES256 end-entity certificate) for tests and the
provenance benchmark. Never for production: the root's key is discarded and anyone can make one.

Shapes follow the C2PA certificate profile that c2pa-rs enforces: the signing certificate is
X.509 v3, not a CA, not self-signed, has `digitalSignature` key usage (critical), an
`extendedKeyUsage` with emailProtection (and the C2PA claim-signing OID), authority and subject
key identifiers, and ECDSA P-256 for `es256`. Needs `cryptography` (c2pa-python depends on it).
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

# C2PA claim-signing EKU (C2PA 2.x trust model).
C2PA_CLAIM_SIGNING_OID = "1.3.6.1.4.1.62558.2.1"


def make_signing_identity(directory: str | os.PathLike[str]) -> tuple[Path, Path, str]:
    """Write `chain.pem` (signing cert, then root) and `key.pem` (0600) into `directory`.

    Returns (chain_path, key_path, root_pem): pass root_pem to a reader as a trust anchor.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "serve-app test CA"),
            x509.NameAttribute(NameOID.COMMON_NAME, "serve-app throwaway root"),
        ]
    )
    root_ski = x509.SubjectKeyIdentifier.from_public_key(root_key.public_key())
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(certificate_authority=True),
            critical=True,
        )
        .add_extension(root_ski, critical=False)
        .sign(root_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "serve-app test"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "serve-app throwaway signer"),
                ]
            )
        )
        .issuer_name(root_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(certificate_authority=False),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [
                    ExtendedKeyUsageOID.EMAIL_PROTECTION,
                    x509.ObjectIdentifier(C2PA_CLAIM_SIGNING_OID),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski),
            critical=False,
        )
        .sign(root_key, hashes.SHA256())
    )

    pem = serialization.Encoding.PEM
    root_pem = root.public_bytes(pem).decode("ascii")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chain_path = directory / "chain.pem"
    key_path = directory / "key.pem"
    chain_path.write_text(leaf.public_bytes(pem).decode("ascii") + root_pem)
    key_path.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return chain_path, key_path, root_pem


def _key_usage(certificate_authority: bool) -> Any:
    """A CA signs certificates (and CRLs); the signer signs manifests (digitalSignature)."""
    from cryptography import x509

    return x509.KeyUsage(
        digital_signature=not certificate_authority,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=certificate_authority,
        crl_sign=certificate_authority,
        encipher_only=False,
        decipher_only=False,
    )
