"""Provenance marks: what each encoded image says about how it was made.

Two layers, both opt-out/opt-in per model (`serve_app.config.provenance`):
- marks on every image (default on): an XMP packet with the IPTC `DigitalSourceType` and
  `xmp:CreatorTool`, plus EXIF `Software`, written by Pillow's own save parameters. They are
  deterministic (no timestamps, no ids), so the same image gives the same bytes;
- an optional C2PA manifest signed with the operator's certificate (`C2paSigner`, needs
  `c2pa-python`, imported only when configured). A manifest carries a fresh instance id,
  manifest label and ECDSA signature, so signed bytes differ per request.

No Ray, no torch.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from xml.sax.saxutils import escape

if TYPE_CHECKING:
    from serve_app.config.provenance import C2paConfig, ProvenanceConfig

# IPTC NewsCodes digital source types (https://cv.iptc.org/newscodes/digitalsourcetype/).
TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
COMPOSITE = "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
EXIF_SOFTWARE = 0x0131
PNG_XMP_KEY = "XML:com.adobe.xmp"  # the iTXt keyword the XMP spec (part 3) assigns to PNG


@dataclass(frozen=True)
class Provenance:
    """What one encoded image declares: how it was made, by what, and whether it was edited."""

    source_type: str
    software: str
    model: str
    action: Literal["created", "edited"]


def provenance_for(
    config: ProvenanceConfig, model_id: str, *, edit: bool, composite: bool
) -> Provenance | None:
    """The provenance of one result, or None when the model's marks are disabled.

    - Generations: every pixel comes from the model: `trainedAlgorithmicMedia`, created.
    - Unmasked edits and variations: the model still generates the whole image, only
      conditioned on the input, so the source type stays `trainedAlgorithmicMedia`; the action
      is edited (the input is its parent).
    - Masked edits: this server pastes the input's unmasked pixels back around the generated
      region (inpainting), so the result mixes captured/uploaded pixels with generated ones:
      `compositeWithTrainedAlgorithmicMedia`, edited.
    """
    if not config.enabled:
        return None
    return Provenance(
        source_type=COMPOSITE if composite else TRAINED,
        software=f"{config.software} (model {model_id})",
        model=model_id,
        action="edited" if edit else "created",
    )


def xmp_packet(p: Provenance) -> bytes:
    """A minimal, deterministic XMP packet (UTF-8): IPTC DigitalSourceType and CreatorTool.

    DigitalSourceType is written as a simple element holding the URI, the form the IPTC examples
    and exiftool itself write (exiftool reads the rdf:resource form the same way). No padding, no
    dates, no instance ids: equal inputs give equal bytes.
    """
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about=""'
        ' xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"'
        ' xmlns:xmp="http://ns.adobe.com/xap/1.0/">'
        f"<Iptc4xmpExt:DigitalSourceType>{escape(p.source_type)}</Iptc4xmpExt:DigitalSourceType>"
        f"<xmp:CreatorTool>{escape(p.software)}</xmp:CreatorTool>"
        "</rdf:Description></rdf:RDF></x:xmpmeta>"
        '<?xpacket end="r"?>'
    ).encode()


def exif_bytes(p: Provenance) -> bytes:
    """EXIF with only `Software` (0x0131), as Pillow serializes it (deterministic)."""
    from PIL import Image

    exif = Image.Exif()
    exif[EXIF_SOFTWARE] = p.software
    return exif.tobytes()


def save_params(p: Provenance, output_format: str) -> dict[str, Any]:
    """Extra `Image.save` keyword arguments that write the marks, per format.

    Pillow 13: PNG has no `xmp=` save parameter, so XMP goes in an uncompressed iTXt chunk
    keyed `XML:com.adobe.xmp` through `pnginfo`, EXIF in an eXIf chunk through `exif=`; JPEG
    and WebP take `xmp=` (JPEG APP1 / WebP `XMP ` chunk) and `exif=` (APP1 / `EXIF` chunk).
    """
    xmp = xmp_packet(p)
    exif = exif_bytes(p)
    if output_format == "png":
        from PIL import PngImagePlugin

        info = PngImagePlugin.PngInfo()
        info.add_itxt(PNG_XMP_KEY, xmp.decode("utf-8"), zip=False)
        return {"pnginfo": info, "exif": exif}
    if output_format in ("jpeg", "webp"):
        return {"xmp": xmp, "exif": exif}
    raise ValueError(f"unknown output format {output_format!r}")


def _read_secret(path: str | None, env: str | None, what: str, path_field: str) -> str:
    """PEM text from a file (`~`/`$VARS` expanded) or an environment variable."""
    if path:
        expanded = Path(os.path.expandvars(os.path.expanduser(path)))
        try:
            text = expanded.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(
                f"c2pa.{path_field}: cannot read the {what} {expanded}: {exc}"
            ) from None
        source = f"c2pa.{path_field} ({expanded})"
    elif env:
        text = os.environ.get(env, "")
        if not text.strip():
            raise ValueError(f"c2pa: the environment variable {env} (the {what}) is unset or empty")
        source = f"the environment variable {env}"
    else:
        env_field = path_field.replace("_file", "_env")
        raise ValueError(f"c2pa: the {what} is missing: set c2pa.{path_field} or c2pa.{env_field}")
    if "-----BEGIN " not in text:
        raise ValueError(f"c2pa: {source} does not hold a PEM {what}")
    return text


def _package_version() -> str:
    try:
        return metadata.version("serve-app")
    except metadata.PackageNotFoundError:
        return "0"


_PROBE = Provenance(TRAINED, "serve-app (signing probe)", "probe", "created")


def _probe_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    return buffer.getvalue()


class C2paSigner:
    """Signs C2PA manifests into encoded images with the operator's certificate and key.

    Built once per replica: the PEM chain and key are read and the native signer is made here,
    so a missing or unreadable credential fails the replica at start, not a request. Uses
    c2pa-python's Context API (0.38: `Context(settings, signer)`, `Builder(manifest, context)`,
    `Builder.add_ingredient`, `Builder.sign(format, source, dest)`).
    """

    def __init__(self, config: C2paConfig) -> None:
        cert = _read_secret(config.cert_file, config.cert_env, "certificate chain", "cert_file")
        key = _read_secret(config.key_file, config.key_env, "private key", "key_file")
        try:
            import c2pa
        except ImportError:
            raise ValueError(
                "c2pa signing is configured but c2pa-python is not installed: "
                "pip install 'serve-app[c2pa]'"
            ) from None
        self._c2pa = c2pa
        self._generator = {"name": "serve-app", "version": _package_version()}
        try:
            signer = c2pa.Signer.from_info(
                c2pa.C2paSignerInfo(config.algorithm, cert.encode(), key.encode(), config.tsa_url)
            )
            # No claim thumbnail: a 1024-px thumbnail re-encode per image is the largest cost
            # of signing and viewers show the image itself.
            self._context = c2pa.Context.from_dict(
                {"builder": {"thumbnail": {"enabled": False}}}, signer=signer
            )
            # One probe signature now: a key that does not match the certificate, a certificate
            # C2PA refuses or an unreachable TSA fails the replica's start, not a request.
            self.sign(_probe_png(), "png", _PROBE)
        except (c2pa.C2paError, ValueError, TypeError) as exc:
            raise ValueError(
                "c2pa: a probe signature with the configured certificate chain and key failed "
                f"(mismatched key, a certificate C2PA refuses, or tsa_url unreachable): {exc}"
            ) from None

    def manifest(self, p: Provenance, ingredient_count: int = 0) -> dict[str, Any]:
        """The manifest definition: one `c2pa.actions.v2` assertion.

        C2PA 2.x requires the first action to be `c2pa.created` or `c2pa.opened`. Edits with
        inputs open the first input (parentOf) and place the others (componentOf), then
        `c2pa.edited`; an edit signed without its inputs starts with `c2pa.created`.
        """
        agent = {"name": p.software}
        action: dict[str, Any] = {
            "action": f"c2pa.{p.action}",
            "digitalSourceType": p.source_type,
            "softwareAgent": agent,
            "description": f"image {p.action} by the model {p.model}",
        }
        actions: list[dict[str, Any]] = []
        if p.action == "edited":
            if ingredient_count:
                actions.append(
                    {"action": "c2pa.opened", "parameters": {"ingredientIds": ["input-0"]}}
                )
                actions.extend(
                    {"action": "c2pa.placed", "parameters": {"ingredientIds": [f"input-{i}"]}}
                    for i in range(1, ingredient_count)
                )
            else:
                actions.append(
                    {
                        "action": "c2pa.created",
                        "digitalSourceType": p.source_type,
                        "softwareAgent": agent,
                    }
                )
        actions.append(action)
        return {
            "claim_generator_info": [self._generator],
            "assertions": [{"label": "c2pa.actions.v2", "data": {"actions": actions}}],
        }

    def sign(
        self,
        data: bytes,
        output_format: str,
        provenance: Provenance,
        ingredients: Sequence[bytes] = (),
    ) -> bytes:
        """`data` (an encoded image) with a signed C2PA manifest embedded.

        `ingredients` are PNG bytes of the inputs of an edit or variation, in request order;
        the first is the parent. They are hashed into the manifest (no thumbnails).
        """
        mime = MEDIA_TYPES.get(output_format)
        if mime is None:
            raise ValueError(f"unknown output format {output_format!r}")
        c2pa = self._c2pa
        builder = c2pa.Builder(self.manifest(provenance, len(ingredients)), context=self._context)
        try:
            for i, ingredient in enumerate(ingredients):
                builder.add_ingredient(
                    {
                        "title": f"input-{i}.png",
                        "relationship": "parentOf" if i == 0 else "componentOf",
                        "label": f"input-{i}",
                    },
                    "image/png",
                    io.BytesIO(ingredient),
                )
            out = io.BytesIO()
            builder.sign(mime, io.BytesIO(data), out)
        finally:
            builder.close()
        return out.getvalue()


def read_c2pa(data: bytes, output_format: str, trust_anchors_pem: str | None = None) -> dict:
    """The C2PA manifest store of an image, for tests and operators.

    Returns the store JSON as a dict (`active_manifest`, `manifests`, `validation_results`)
    with `validation_state` set: "Trusted" when the signing chain ends in one of
    `trust_anchors_pem` (PEM roots, passed as the reader's `trust.user_anchors` setting),
    "Valid" when only integrity is checked (no anchors: `verify.verify_trust` off), "Invalid" on
    any failure (e.g. a data hash mismatch). Raises ValueError when there is no manifest.
    """
    import c2pa

    mime = MEDIA_TYPES.get(output_format, output_format)
    settings: dict[str, Any] = {"verify": {"verify_trust": trust_anchors_pem is not None}}
    if trust_anchors_pem is not None:
        settings["trust"] = {"user_anchors": trust_anchors_pem}
    context = c2pa.Context.from_dict(settings)
    try:
        try:
            reader = c2pa.Reader(mime, io.BytesIO(data), None, context)
        except c2pa.C2paError.ManifestNotFound:
            raise ValueError("no C2PA manifest in the image") from None
        with reader:
            store: dict[str, Any] = json.loads(reader.json())
            store["validation_state"] = reader.get_validation_state()
    finally:
        context.close()
    return store
