"""Provenance marks (XMP DigitalSourceType, EXIF Software) on every encoded image, read back by
exiftool, and C2PA manifests signed with a throwaway CA and read back with c2pa-python.

exiftool is a test requirement (Debian `libimage-exiftool-perl`, `scripts/setup.sh --tests`):
these tests fail, not skip, without it, so CI cannot pass them silently.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serve_app.codec import encode_image
from serve_app.config.provenance import C2paConfig, ProvenanceConfig
from serve_app.provenance import (
    COMPOSITE,
    TRAINED,
    C2paSigner,
    Provenance,
    provenance_for,
    read_c2pa,
    xmp_packet,
)
from tests.c2pa_certs import make_signing_identity

MODEL = "black-forest-labs/FLUX.1-Kontext-dev"
FORMATS = ["png", "jpeg", "webp"]
GENERATED = provenance_for(ProvenanceConfig(), MODEL, edit=False, composite=False)
MASKED_EDIT = provenance_for(ProvenanceConfig(), MODEL, edit=True, composite=True)


@pytest.fixture
def noise() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def exiftool() -> str:
    path = shutil.which("exiftool")
    assert path, (
        "exiftool is required by these tests: apt-get install libimage-exiftool-perl "
        "(bash scripts/setup.sh --tests installs it)"
    )
    return path


def read_marks(exiftool: str, data: bytes, fmt: str, tmp_path: Path) -> dict:
    """What exiftool reads: DigitalSourceType (-n: the raw URI), CreatorTool, EXIF Software."""
    path = tmp_path / f"image.{fmt}"
    path.write_bytes(data)
    out = subprocess.run(
        [exiftool, "-j", "-n", "-XMP-iptcExt:DigitalSourceType", "-XMP-xmp:CreatorTool",
         "-EXIF:Software", str(path)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return json.loads(out.stdout)[0]


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# --- what each kind of result declares ----------------------------------------------------------


def test_provenance_per_kind_of_result():
    config = ProvenanceConfig()
    assert GENERATED == Provenance(TRAINED, f"serve-app (model {MODEL})", MODEL, "created")
    unmasked = provenance_for(config, MODEL, edit=True, composite=False)
    assert unmasked and (unmasked.source_type, unmasked.action) == (TRAINED, "edited")
    assert MASKED_EDIT and (MASKED_EDIT.source_type, MASKED_EDIT.action) == (COMPOSITE, "edited")
    custom = provenance_for(ProvenanceConfig(software="acme-images"), MODEL, edit=False,
                            composite=False)  # fmt: skip
    assert custom and custom.software == f"acme-images (model {MODEL})"
    assert (
        provenance_for(ProvenanceConfig(enabled=False), MODEL, edit=False, composite=False) is None
    )


def test_xmp_packet_is_deterministic_and_escaped():
    assert GENERATED
    assert xmp_packet(GENERATED) == xmp_packet(GENERATED)
    odd = Provenance(TRAINED, "a<b & c", "m", "created")
    assert b"a&lt;b &amp; c" in xmp_packet(odd)
    assert b"xmp.iid" not in xmp_packet(GENERATED) and b"Date" not in xmp_packet(GENERATED)


# --- marks in each format -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_exiftool_reads_the_marks(exiftool, noise, fmt, tmp_path):
    marks = read_marks(exiftool, encode_image(noise, fmt, 90, provenance=GENERATED), fmt, tmp_path)
    assert marks.get("DigitalSourceType") == TRAINED
    assert "trainedAlgorithmicMedia" in marks["DigitalSourceType"]
    assert MODEL in marks.get("Software", "")
    assert marks.get("CreatorTool") == marks["Software"] == f"serve-app (model {MODEL})"


@pytest.mark.parametrize("fmt", FORMATS)
def test_masked_edit_is_composite(exiftool, noise, fmt, tmp_path):
    data = encode_image(noise, fmt, 100, provenance=MASKED_EDIT)
    assert read_marks(exiftool, data, fmt, tmp_path).get("DigitalSourceType") == COMPOSITE


@pytest.mark.parametrize("fmt", FORMATS)
def test_unmarked_bytes_are_unchanged(exiftool, noise, fmt, tmp_path):
    """provenance=None is the codec as it was: the same Pillow call, byte for byte."""
    old = io.BytesIO()
    if fmt == "png":
        noise.save(old, format="PNG", compress_level=1)
    elif fmt == "jpeg":
        noise.save(old, format="JPEG", quality=90)
    else:
        noise.save(old, format="WEBP", quality=90)
    assert encode_image(noise, fmt, 90) == encode_image(noise, fmt, 90, None) == old.getvalue()
    marks = read_marks(exiftool, old.getvalue(), fmt, tmp_path)
    assert "DigitalSourceType" not in marks and "Software" not in marks


@pytest.mark.parametrize("fmt, compression", [("png", 100), ("jpeg", 90), ("webp", 100),
                                              ("webp", 80)])  # fmt: skip
def test_marks_change_no_pixel_and_are_deterministic(noise, fmt, compression):
    marked = encode_image(noise, fmt, compression, provenance=GENERATED)
    plain = encode_image(noise, fmt, compression)
    assert marked != plain and len(marked) > len(plain)
    assert np.array_equal(pixels(marked), pixels(plain))
    if fmt == "png" or compression >= 100:  # lossless: equal to the source, pixel for pixel
        assert np.array_equal(pixels(marked), np.asarray(noise))
    # Same image (even another copy of it) and same provenance: same bytes.
    assert encode_image(noise.copy(), fmt, compression, provenance=GENERATED) == marked
    assert encode_image(noise, fmt, compression, provenance=MASKED_EDIT) != marked


# --- C2PA ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def identity(tmp_path_factory) -> tuple[Path, Path, str]:
    return make_signing_identity(tmp_path_factory.mktemp("c2pa"))


@pytest.fixture(scope="module")
def signer(identity) -> C2paSigner:
    chain, key, _ = identity
    return C2paSigner(C2paConfig(cert_file=str(chain), key_file=str(key)))


def active(store: dict) -> dict:
    return store["manifests"][store["active_manifest"]]


def actions(store: dict) -> list[dict]:
    (assertion,) = [a for a in active(store)["assertions"] if a["label"] == "c2pa.actions.v2"]
    return assertion["data"]["actions"]


def failure_codes(store: dict) -> set[str]:
    return {f["code"] for f in store["validation_results"]["activeManifest"]["failure"]}


def flip_image_byte(data: bytes, fmt: str) -> bytes:
    """One byte flipped inside the compressed pixel data (not the metadata, not the manifest)."""
    if fmt == "png":
        start = data.index(b"IDAT") + 4
    elif fmt == "jpeg":
        sos = data.index(b"\xff\xda")
        start = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
    else:
        start = max(data.find(b"VP8L"), data.find(b"VP8 ")) + 8
    at = start + 16
    while data[at] in (0x00, 0xFE, 0xFF):  # keep JPEG markers and stuffing intact
        at += 1
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


@pytest.mark.parametrize("fmt", FORMATS)
def test_c2pa_signed_generation_is_trusted(signer, identity, exiftool, noise, fmt, tmp_path):
    assert GENERATED
    marked = encode_image(noise, fmt, 100, provenance=GENERATED)
    signed = signer.sign(marked, fmt, GENERATED)
    store = read_c2pa(signed, fmt, trust_anchors_pem=identity[2])
    assert store["validation_state"] == "Trusted", store["validation_results"]
    assert read_c2pa(signed, fmt)["validation_state"] == "Valid"  # integrity only, no anchors
    (action,) = actions(store)
    assert action["action"] == "c2pa.created"
    assert action["digitalSourceType"] == TRAINED
    assert action["softwareAgent"]["name"] == f"serve-app (model {MODEL})"
    assert active(store)["claim_generator_info"][0]["name"] == "serve-app"
    # Signing adds the manifest, changes no pixel, and keeps the XMP/EXIF marks readable.
    assert np.array_equal(pixels(signed), pixels(marked))
    marks = read_marks(exiftool, signed, fmt, tmp_path)
    assert marks.get("DigitalSourceType") == TRAINED and MODEL in marks.get("CreatorTool", "")
    # EXIF is still there too. (exiftool 12.57 does not show it in a signed PNG: it mistakes
    # the eXIf IFD0 offset for the caBX chunk's JUMBF box at the same relative offset and warns
    # "IFD0 pointer references previous JUMBFBox directory"; Pillow reads the chunk.)
    assert MODEL in Image.open(io.BytesIO(signed)).getexif().get(0x0131, "")
    if fmt != "png":
        assert MODEL in marks.get("Software", "")


def test_c2pa_edit_from_env_with_ingredients(identity, noise, monkeypatch):
    chain, key, root = identity
    monkeypatch.setenv("TEST_C2PA_CERT", chain.read_text())
    monkeypatch.setenv("TEST_C2PA_KEY", key.read_text())
    env_signer = C2paSigner(C2paConfig(cert_env="TEST_C2PA_CERT", key_env="TEST_C2PA_KEY"))
    assert MASKED_EDIT
    inputs = [encode_image(noise), encode_image(noise.rotate(90, expand=True))]
    signed = env_signer.sign(encode_image(noise, "png", provenance=MASKED_EDIT), "png",
                             MASKED_EDIT, inputs)  # fmt: skip
    store = read_c2pa(signed, "png", trust_anchors_pem=root)
    assert store["validation_state"] == "Trusted", store["validation_results"]
    assert [a["action"] for a in actions(store)] == ["c2pa.opened", "c2pa.placed", "c2pa.edited"]
    edited = actions(store)[-1]
    assert edited["digitalSourceType"] == COMPOSITE and MODEL in edited["softwareAgent"]["name"]
    ingredients = active(store)["ingredients"]
    assert [(i["title"], i["relationship"]) for i in ingredients] == [
        ("input-0.png", "parentOf"),
        ("input-1.png", "componentOf"),
    ]


def test_c2pa_edit_without_inputs_starts_with_created(signer, identity, noise):
    """C2PA 2.x wants `c2pa.created` or `c2pa.opened` first; without ingredients it is created."""
    unmasked = provenance_for(ProvenanceConfig(), MODEL, edit=True, composite=False)
    assert unmasked
    signed = signer.sign(encode_image(noise, "jpeg", 90, provenance=unmasked), "jpeg", unmasked)
    store = read_c2pa(signed, "jpeg", trust_anchors_pem=identity[2])
    assert store["validation_state"] == "Trusted"
    assert [a["action"] for a in actions(store)] == ["c2pa.created", "c2pa.edited"]
    assert {a["digitalSourceType"] for a in actions(store)} == {TRAINED}


@pytest.mark.parametrize("fmt", FORMATS)
def test_c2pa_tampered_pixels_fail_validation(signer, identity, noise, fmt):
    assert GENERATED
    signed = signer.sign(encode_image(noise, fmt, 100, provenance=GENERATED), fmt, GENERATED)
    store = read_c2pa(flip_image_byte(signed, fmt), fmt, trust_anchors_pem=identity[2])
    assert store["validation_state"] == "Invalid"
    assert "assertion.dataHash.mismatch" in failure_codes(store)


def test_c2pa_other_root_is_not_trusted(signer, noise, tmp_path):
    assert GENERATED
    _, _, other_root = make_signing_identity(tmp_path / "other")
    signed = signer.sign(encode_image(noise, provenance=GENERATED), "png", GENERATED)
    store = read_c2pa(signed, "png", trust_anchors_pem=other_root)
    assert store["validation_state"] != "Trusted"
    assert "signingCredential.untrusted" in failure_codes(store)


def test_c2pa_signed_bytes_are_unique_per_signature(signer, noise):
    """Manifest label, instance id and ECDSA signature are fresh each time (see docs)."""
    assert GENERATED
    data = encode_image(noise, provenance=GENERATED)
    first, second = (signer.sign(data, "png", GENERATED) for _ in range(2))
    assert first != second
    assert (
        active(read_c2pa(first, "png"))["instance_id"]
        != active(read_c2pa(second, "png"))["instance_id"]
    )


def test_c2pa_unsigned_image_has_no_manifest(noise):
    with pytest.raises(ValueError, match="no C2PA manifest"):
        read_c2pa(encode_image(noise, provenance=GENERATED), "png")


def test_c2pa_credentials_errors_name_what_is_missing(identity, tmp_path, monkeypatch):
    chain, key, _ = identity
    with pytest.raises(ValueError, match="cert_file or c2pa.cert_env"):
        C2paSigner(C2paConfig(key_file=str(key)))
    with pytest.raises(ValueError, match="key_file or c2pa.key_env"):
        C2paSigner(C2paConfig(cert_file=str(chain)))
    with pytest.raises(ValueError, match=r"c2pa.key_file: cannot read the private key"):
        C2paSigner(C2paConfig(cert_file=str(chain), key_file=str(tmp_path / "absent.pem")))
    monkeypatch.delenv("TEST_C2PA_UNSET", raising=False)
    with pytest.raises(ValueError, match="TEST_C2PA_UNSET"):
        C2paSigner(C2paConfig(cert_env="TEST_C2PA_UNSET", key_file=str(key)))
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match="does not hold a PEM certificate chain"):
        C2paSigner(C2paConfig(cert_file=str(tmp_path / "junk.pem"), key_file=str(key)))
    # A key that does not match the certificate is refused when the replica starts.
    _, other_key, _ = make_signing_identity(tmp_path / "other")
    with pytest.raises(ValueError, match="probe signature"):
        C2paSigner(C2paConfig(cert_file=str(chain), key_file=str(other_key)))


def test_c2pa_signer_is_shared_across_threads(signer, identity, noise):
    """One signer per replica, called from the encoding threads at once."""
    from concurrent.futures import ThreadPoolExecutor

    assert MASKED_EDIT
    inputs = [encode_image(noise)]
    encoded = {fmt: encode_image(noise, fmt, 100, provenance=MASKED_EDIT) for fmt in FORMATS}

    def sign_and_read(i: int) -> str:
        fmt = FORMATS[i % len(FORMATS)]
        signed = signer.sign(encoded[fmt], fmt, MASKED_EDIT, inputs)
        return read_c2pa(signed, fmt, trust_anchors_pem=identity[2])["validation_state"]

    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(sign_and_read, range(12))) == {"Trusted"}
