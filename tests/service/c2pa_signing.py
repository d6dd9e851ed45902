"""C2PA manifests signed in the tests, with a throwaway CA and signer made with ``cryptography``
(nothing is read from disk or the network), through the official ``c2pa-python`` Builder."""
from __future__ import annotations

import datetime
import io
from dataclasses import dataclass
from typing import Optional

IPTC = "http://cv.iptc.org/newscodes/digitalsourcetype/"


@dataclass(frozen=True)
class Credentials:
    ca_pem: bytes
    chain_pem: bytes  # signer certificate, then the CA
    key_pem: bytes


def make_credentials(org: str = "Throwaway Test Org") -> Credentials:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)])

    def usage(sign: bool) -> x509.KeyUsage:
        return x509.KeyUsage(digital_signature=sign, content_commitment=False,
                             key_encipherment=False, data_encipherment=False, key_agreement=False,
                             key_cert_sign=not sign, crl_sign=not sign, encipher_only=False,
                             decipher_only=False)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("Test Root CA"))
          .issuer_name(name("Test Root CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(usage(False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    signer = (x509.CertificateBuilder().subject_name(name("Test Signer"))
              .issuer_name(ca.subject).public_key(key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(days=1))
              .not_valid_after(now + datetime.timedelta(days=30))
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(usage(True), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]),
                             critical=False)
              .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                             critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                  ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return Credentials(ca.public_bytes(pem), signer.public_bytes(pem) + ca.public_bytes(pem),
                       key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))


def sign(image_bytes: bytes, mime: str, credentials: Credentials,
         source_type: Optional[str] = "trainedAlgorithmicMedia",
         generator: str = "TestGen", version: str = "1.0") -> bytes:
    """``image_bytes`` with an embedded C2PA manifest: one c2pa.created action declaring
    ``source_type`` (an IPTC digital source type name), by ``generator``."""
    import c2pa

    action = {"action": "c2pa.created", "softwareAgent": {"name": generator}}
    if source_type:
        action["digitalSourceType"] = IPTC + source_type
    manifest = {"claim_generator_info": [{"name": generator, "version": version}],
                "title": "test image",
                "assertions": [{"label": "c2pa.actions", "data": {"actions": [action]}}]}
    info = c2pa.C2paSignerInfo(c2pa.C2paSigningAlg.ES256, credentials.chain_pem,
                               credentials.key_pem, None)
    out = io.BytesIO()
    with c2pa.Signer.from_info(info) as signer, c2pa.Builder(manifest) as builder:
        builder.sign(signer, mime, io.BytesIO(image_bytes), out)
    return out.getvalue()
