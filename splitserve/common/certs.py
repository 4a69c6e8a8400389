"""The cluster's certificates for mutual TLS between splitserve's services: one CA, and per service
a key and a certificate whose common name says its role (splitserve-scheduler, splitserve-prefill,
...). Servers verify callers against the CA and admit each method only from the roles that call it
(auth.CALLER_ROLES); clients verify servers against the CA and the DNS name of the role they mean to
reach (splitserve-ROLE, in that role's certificate; every certificate also carries the cluster's
name, splitserve-cluster, which a service's own health check dials itself by).

`splitserve certs --out DIR` writes DIR/ca.crt and DIR/ca.key (keep the CA key offline) and, per
role, DIR/ROLE/{ca.crt,tls.crt,tls.key}: the layout of a Kubernetes TLS secret with the CA added, so
that a service is given one folder (--cluster-tls-dir). `splitserve up --cluster-tls` makes a fresh set
per run.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Every cluster certificate names the cluster: clients check a server against it (the address a
# client dials, an IP, is in no certificate), so any member can serve and only members can.
CLUSTER_NAME = "splitserve-cluster"
ROLE_PREFIX = "splitserve-"
# admin: operator tools (splitserve adapt, drain scripts); gateway: the client edge's calls inward.
ROLES = ("scheduler", "prefill", "decode", "colocated", "gateway", "admin")
CA_FILE, CERT_FILE, KEY_FILE = "ca.crt", "tls.crt", "tls.key"
DEFAULT_DAYS = 365
MAX_PEM_BYTES = 64 << 10  # a certificate chain or key past this is not ours


@dataclass(frozen=True)
class ClusterTLS:
    """One service's TLS material (PEM) and the role its certificate names."""

    ca: bytes
    cert: bytes
    key: bytes = field(repr=False)
    role: str


def role_of(common_name: str) -> str | None:
    """The role a certificate's common name gives (splitserve-ROLE), None for any other name."""
    role = common_name.removeprefix(ROLE_PREFIX)
    return role if common_name.startswith(ROLE_PREFIX) and role in ROLES else None


def load_cluster_tls(directory: str | os.PathLike) -> ClusterTLS:
    """The CA, certificate and key in directory (ca.crt, tls.crt, tls.key); ValueError saying what
    is wrong when a file is missing or unreadable, the certificate names no role, or is not signed by
    the CA, or the key is not the certificate's."""
    folder = Path(directory)
    ca, cert, key = (_read_pem(folder / name) for name in (CA_FILE, CERT_FILE, KEY_FILE))
    try:
        ca_cert, leaf = x509.load_pem_x509_certificate(ca), x509.load_pem_x509_certificate(cert)
        private_key = serialization.load_pem_private_key(key, password=None)
    except ValueError as exc:
        raise ValueError(f"{folder}: not a PEM certificate or unencrypted PEM key: {exc}") from None
    names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    role = role_of(str(names[0].value)) if len(names) == 1 else None
    if role is None:
        raise ValueError(f"{folder / CERT_FILE}: its common name must be {ROLE_PREFIX}ROLE, ROLE one of "
                         f"{', '.join(ROLES)} (splitserve certs writes such certificates)")
    try:
        leaf.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise ValueError(f"{folder / CERT_FILE} is not signed by {folder / CA_FILE}: {exc}") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if (private_key.public_key().public_bytes(serialization.Encoding.DER, public)
            != leaf.public_key().public_bytes(serialization.Encoding.DER, public)):
        raise ValueError(f"{folder / KEY_FILE} is not the key of {folder / CERT_FILE}")
    return ClusterTLS(ca=ca, cert=cert, key=key, role=role)


def _read_pem(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_PEM_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if len(data) > MAX_PEM_BYTES:
        raise ValueError(f"{path} is over {MAX_PEM_BYTES} bytes")
    return data


def write_cluster_certs(out: Path, days: int = DEFAULT_DAYS, roles: tuple[str, ...] = ROLES,
                        gateway_names: tuple[str, ...] = (), keep_ca_key: bool = True) -> None:
    """A new CA in out (ca.crt, and ca.key unless keep_ca_key is False: a set made for one run needs
    no more certificates) and, per role, out/ROLE/{ca.crt,tls.crt,tls.key}; keys are P-256, readable
    by their owner only. gateway_names (DNS names or IPs) go into the gateway's certificate too, so
    that it can serve clients over TLS (--tls-cert/--tls-key) under those names."""
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    now = datetime.now(timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{CLUSTER_NAME} CA")])
    ca_cert = (_builder(ca_name, ca_name, ca_key.public_key(), now, days)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(_key_usage(ca=True), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    _write(out / CA_FILE, ca_pem)
    if keep_ca_key:
        _write(out / "ca.key", _key_pem(ca_key), secret=True)
    for role in roles:
        key = ec.generate_private_key(ec.SECP256R1())
        names = [CLUSTER_NAME, f"{ROLE_PREFIX}{role}", *(gateway_names if role == "gateway" else ())]
        cert = (_builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{ROLE_PREFIX}{role}")]),
                         ca_name, key.public_key(), now, days)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(_key_usage(ca=False), critical=True)
                # An operator's tools only call: the admin certificate cannot serve as anything.
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH] if role == "admin" else
                                                     [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        folder = out / role
        folder.mkdir(mode=0o700, exist_ok=True)
        _write(folder / CA_FILE, ca_pem)
        _write(folder / CERT_FILE, cert.public_bytes(serialization.Encoding.PEM))
        _write(folder / KEY_FILE, _key_pem(key), secret=True)


def _builder(subject: x509.Name, issuer: x509.Name, public_key, now: datetime, days: int) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))  # clocks of a cluster's machines differ a little
            .not_valid_after(now + timedelta(days=days)))


def _key_usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=not ca, key_cert_sign=ca, crl_sign=ca,
                         encipher_only=False, decipher_only=False)


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, secret: bool = False) -> None:
    """Write data to path, created readable by its owner only when secret."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600 if secret else 0o644)  # an existing file keeps its mode through O_CREAT


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("certs", help="write a cluster CA and per-service certificates for mutual TLS",
                            description="Write a new cluster CA and, for each role (" + ", ".join(ROLES) +
                                        "), a P-256 key and certificate signed by it, for mutual TLS "
                                        "between splitserve's services. See docs/security.md.")
    parser.add_argument("--out", required=True, help="folder to write the CA and one folder per role into")
    parser.add_argument("--days", type=int, default=DEFAULT_DAYS,
                        help=f"days the certificates are valid (default: {DEFAULT_DAYS})")
    parser.add_argument("--gateway-name", action="append", default=[], metavar="NAME",
                        help="a DNS name or IP clients reach the gateway by, added to its certificate so "
                             "that it can serve HTTPS / gRPC TLS with it (repeatable)")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if not 1 <= args.days <= 3650:
        raise SystemExit("--days must be 1 to 3650")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: splitserve certs writes a new CA into an empty folder")
    write_cluster_certs(out, args.days, gateway_names=tuple(args.gateway_name))
    print(f"wrote a CA ({out / CA_FILE}, {out / 'ca.key'}: keep the CA key offline) and, for each of "
          f"{', '.join(ROLES)}, {out}/ROLE/{{{CA_FILE},{CERT_FILE},{KEY_FILE}}}: give each service its "
          f"folder (--cluster-tls-dir, env SPLITSERVE_CLUSTER_TLS_DIR)")
    return 0
