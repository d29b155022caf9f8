"""A throwaway C2PA signing identity for tests (unit and integration): root CA + ES256 signer.

The maker lives in `serve_app.provenance_certs` so the provenance benchmark uses the same one.
"""

from serve_app.provenance_certs import C2PA_CLAIM_SIGNING_OID, make_signing_identity

__all__ = ["C2PA_CLAIM_SIGNING_OID", "make_signing_identity"]
