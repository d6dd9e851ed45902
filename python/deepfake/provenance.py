"""Provenance: what the file itself declares about its origin, read from its metadata.

Reported apart from the spectral *signal* (:mod:`deepfake.detector`): a declaration is what the
file says, not what its pixels show. Four places are read, the way provenance tools check first:

- **C2PA Content Credentials**, through the official ``c2pa-python`` bindings (never a
  hand-written JUMBF parser): the active manifest's claim generator, the IPTC digital source
  types its actions declare, the signer, and whether the signature validates and whether the
  signer chains to the service's trust list (``DEEPFAKE_C2PA_TRUST_ANCHORS``, a PEM bundle;
  with none configured, no signer can be trusted and the answer says so). Remote manifests and
  OCSP are never fetched: reading an upload makes no network request.
- **XMP** (through Pillow's ``getxmp``, which parses with ``defusedxml``): the IPTC
  ``DigitalSourceType`` and a ``CreatorTool`` naming a known generator.
- **PNG text chunks** (Pillow's ``text``): the chunks common generators write — ``parameters``
  (AUTOMATIC1111, Forge, SD.Next: prompt plus ``Steps:``/``Sampler:``/``Seed:``), ``prompt`` and
  ``workflow`` (ComfyUI node-graph JSON), ``invokeai_metadata``/``sd-metadata``/``Dream``
  (InvokeAI), NovelAI's ``Software``/``Comment``. A chunk counts only if its content has the
  generator's shape, not merely its name.
- **EXIF** (Pillow's ``getexif``): ``Software`` (and XMP ``CreatorTool``) naming a generator
  from :data:`GENERATOR_NAMES`, and a ``UserComment`` holding AUTOMATIC1111-style parameters.

Every item says where it was found and what it says. Absence of all of this proves nothing:
most sites and apps strip metadata, and a generator need not write any.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional

from PIL import Image

log = logging.getLogger("deepfake.provenance")

IPTC_DST = "http://cv.iptc.org/newscodes/digitalsourcetype/"

# IPTC digital source types (https://cv.iptc.org/newscodes/digitalsourcetype/), by what they
# declare. Anything else (digitalCreation, humanEdits, composite, ...) is reported as "other".
AI_GENERATED = ("trainedAlgorithmicMedia",)
AI_COMPOSITE = ("compositeWithTrainedAlgorithmicMedia",)
CAPTURED = ("digitalCapture", "computationalCapture", "negativeFilm", "positiveFilm", "print",
            "minorHumanEdits", "compositeCapture")

# Declarations, strongest claim first (the verdict rules in deepfake/verdict.py use these)
DECLARES_AI = ("ai_generated", "ai_composite")

# Generator names looked for in EXIF Software and XMP CreatorTool (whole words, any case).
GENERATOR_NAMES = (
    "Midjourney", "DALL-E", "DALL·E", "DALLE", "Stable Diffusion", "SDXL", "Stability AI",
    "DreamStudio", "NovelAI", "ComfyUI", "AUTOMATIC1111", "Stable Diffusion web UI",
    "InvokeAI", "Fooocus", "Adobe Firefly", "Firefly", "Imagen", "Ideogram", "Leonardo.Ai",
    "Leonardo AI", "FLUX.1", "Black Forest Labs", "Bing Image Creator", "Image Creator",
    "Craiyon", "NightCafe", "Runway", "Dreamina", "Kling", "Playground AI", "Krea",
    "GPT-4o", "ChatGPT", "Gemini", "Grok", "Aurora",
)
_GENERATOR_RE = re.compile(
    r"(?<![\w])(" + "|".join(re.escape(n) for n in sorted(GENERATOR_NAMES, key=len, reverse=True))
    + r")(?![\w])", re.IGNORECASE)

_A1111_RE = re.compile(r"\b(Steps|Sampler|CFG scale|Seed|Model hash)\s*:", re.IGNORECASE)
MAX_QUOTE = 200  # characters of a prompt or value quoted back in the answer

# EXIF tags (TIFF 6.0 / Exif 2.32)
_SOFTWARE, _EXIF_IFD, _USER_COMMENT = 0x0131, 0x8769, 0x9286

_MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "TIFF": "image/tiff",
         "GIF": "image/gif"}  # BMP cannot carry C2PA


@dataclass(frozen=True)
class Finding:
    """One provenance item: where it was found, what it says and what that declares."""

    source: str  # "c2pa", "xmp", "png_text", "exif"
    where: str  # e.g. "PNG text chunk 'parameters'"
    says: str  # one sentence for people
    declares: str  # "ai_generated", "ai_composite", "captured", "other", "unreadable"
    tool: Optional[str] = None  # the generator or claim generator named, if any
    details: dict[str, Any] = field(default_factory=dict)

    def payload(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrustList:
    """The trust anchors C2PA signers are checked against."""

    pem: Optional[str]  # None: none configured
    description: str

    @classmethod
    def from_file(cls, path: Optional[str]) -> "TrustList":
        if not path:
            return cls(None, "none configured (DEEPFAKE_C2PA_TRUST_ANCHORS is not set), so no "
                       "signer can be trusted; signatures are still checked")
        try:
            with open(path, "r", encoding="ascii") as handle:
                pem = handle.read()
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("cannot read C2PA trust anchors %s: %s", path, exc)
            return cls(None, "the configured file %s could not be read (%s), so no signer can "
                       "be trusted" % (os.path.basename(path), type(exc).__name__))
        count = pem.count("-----BEGIN CERTIFICATE-----")
        if count == 0:
            return cls(None, "the configured file %s holds no certificate, so no signer can be "
                       "trusted" % os.path.basename(path))
        return cls(pem, "%s (%d anchor certificate%s, set by DEEPFAKE_C2PA_TRUST_ANCHORS)"
                   % (os.path.basename(path), count, "" if count == 1 else "s"))


class ProvenanceReader:
    """Reads provenance from an upload; one per service (it holds the C2PA settings)."""

    def __init__(self, trust: TrustList) -> None:
        self.trust = trust
        self._settings: dict[str, Any] = {
            # offline: no remote manifest, no OCSP; trust is checked against our list only
            "verify": {"remote_manifest_fetch": False, "ocsp_fetch": False,
                       "verify_trust": True},
        }
        if trust.pem:
            self._settings["trust"] = {"trust_anchors": trust.pem}
        self._local = threading.local()

    def read(self, data: bytes, image: Image.Image, fmt: str) -> list[Finding]:
        found: list[Finding] = []
        found += self._c2pa(data, fmt)
        found += _xmp(image)
        if fmt == "PNG":
            found += _png_text(image)
        found += _exif(image)
        return found

    def _context(self) -> Any:
        import c2pa  # ~40 ms, once; the native library is loaded on the first analysis
        context = getattr(self._local, "context", None)
        if context is None:  # one per thread: a Context is not documented as thread-safe
            context = c2pa.Context.from_dict(self._settings)
            self._local.context = context
        return context

    def _c2pa(self, data: bytes, fmt: str) -> list[Finding]:
        mime = _MIME.get(fmt)
        if mime is None:
            return []
        import c2pa

        try:
            reader = c2pa.Reader.try_create(mime, io.BytesIO(data), None, self._context())
        except c2pa.C2paError as exc:
            text = str(exc)
            if "ManifestNotFound" in type(exc).__name__ or "no JUMBF" in text:
                return []
            return [Finding("c2pa", "C2PA manifest store", "Content Credentials data is present "
                            "but could not be read (%s); nothing it may declare is used."
                            % _clip(text, 160), "unreadable",
                            details={"error": _clip(text, 300),
                                     "trust_list": self.trust.description})]
        if reader is None:
            return []
        with reader:
            try:
                store = json.loads(reader.json())
            except (ValueError, c2pa.C2paError) as exc:
                return [Finding("c2pa", "C2PA manifest store", "Content Credentials are present "
                                "but their report could not be read (%s)." % type(exc).__name__,
                                "unreadable", details={"trust_list": self.trust.description})]
        return [c2pa_finding(store, self.trust.description)]


def c2pa_finding(store: dict[str, Any], trust_list: str) -> Finding:
    """The active manifest of a c2pa Reader's JSON report, as one :class:`Finding`."""
    manifests = store.get("manifests") or {}
    active = manifests.get(store.get("active_manifest")) or {}
    generator = _claim_generator(active)
    sources, actions = [], []
    for assertion in active.get("assertions") or []:
        if not str(assertion.get("label", "")).startswith("c2pa.actions"):
            continue
        for action in (assertion.get("data") or {}).get("actions") or []:
            dst = action.get("digitalSourceType")
            name = _dst_name(dst) if isinstance(dst, str) else None
            if name and name not in sources:
                sources.append(name)
            agent = action.get("softwareAgent")
            agent_name = agent.get("name") if isinstance(agent, dict) else agent
            actions.append({k: v for k, v in (("action", action.get("action")),
                                              ("digital_source_type", name),
                                              ("software_agent", agent_name)) if v})
    signature = active.get("signature_info") or {}
    state = str(store.get("validation_state") or "")
    results = (store.get("validation_results") or {}).get("activeManifest") or {}
    failures = [{"code": f.get("code"), "explanation": f.get("explanation")}
                for f in results.get("failure") or []]
    codes = {f["code"] for f in failures}
    codes_ok = {s.get("code") for s in results.get("success") or []}
    trusted = state == "Trusted" or "signingCredential.trusted" in codes_ok
    broken = state == "Invalid" or any(c and not c.startswith("signingCredential.untrusted")
                                       and not c.startswith("signingCredential.ocsp")
                                       for c in codes)
    if broken:
        status = "signature or content hash does not validate"
    elif trusted:
        status = "signed, issuer trusted"
    else:
        status = "signed, issuer not trusted"
    issuer = signature.get("issuer") or signature.get("common_name")
    declares = _declares(sources)
    tool = _first_agent(actions) or generator
    what = {"ai_generated": "declare this image AI-generated",
            "ai_composite": "declare this image a composite that includes AI-generated content",
            "captured": "declare a capture (%s)" % ", ".join(s for s in sources if s in CAPTURED),
            "other": ("declare the source type %s" % ", ".join(sources)) if sources
            else "declare no digital source type"}[declares]
    says = "Content Credentials %s (claim generator: %s; signer: %s; %s)." % (
        what, generator or "not named", issuer or "not named", status)
    details = {
        "claim_generator": generator, "title": active.get("title"),
        "digital_source_types": sources, "actions": actions[:20],
        "signature": {k: signature.get(k) for k in ("issuer", "common_name", "alg", "time")
                      if signature.get(k)},
        "validation": {"state": state or None, "status": status, "signature_valid": not broken,
                       "issuer_trusted": trusted and not broken, "failures": failures[:20]},
        "trust_list": trust_list,
        "manifests": len(manifests),
    }
    return Finding("c2pa", "C2PA manifest store (active manifest %s)"
                   % _clip(str(store.get("active_manifest") or "?"), 80), says, declares,
                   tool, details)


def _claim_generator(active: dict[str, Any]) -> Optional[str]:
    info = active.get("claim_generator_info")
    if isinstance(info, list) and info:
        parts = []
        for item in info:
            if isinstance(item, dict) and item.get("name"):
                parts.append(("%s %s" % (item["name"], item.get("version") or "")).strip())
        if parts:
            return ", ".join(parts)
    generator = active.get("claim_generator")
    return str(generator) if generator else None


def _first_agent(actions: list[dict[str, Any]]) -> Optional[str]:
    for action in actions:
        if action.get("digital_source_type") in AI_GENERATED + AI_COMPOSITE \
                and action.get("software_agent"):
            return str(action["software_agent"])
    return None


def _dst_name(value: str) -> str:
    """``trainedAlgorithmicMedia`` from its IPTC IRI (http or https, with or without slash)."""
    return value.rstrip("/").rsplit("/", 1)[-1].strip()


def _declares(sources: Iterable[str]) -> str:
    sources = list(sources)
    if any(s in AI_GENERATED for s in sources):
        return "ai_generated"
    if any(s in AI_COMPOSITE for s in sources):
        return "ai_composite"
    if sources and all(s in CAPTURED for s in sources):
        return "captured"
    return "other"


def _xmp(image: Image.Image) -> list[Finding]:
    try:
        xmp = image.getxmp() if hasattr(image, "getxmp") else {}
    except Exception as exc:  # malformed XML (defusedxml refuses entity tricks loudly)
        return [Finding("xmp", "XMP packet", "An XMP packet is present but could not be parsed "
                        "(%s); nothing it may declare is used." % type(exc).__name__,
                        "unreadable")]
    found = []
    sources = [_dst_name(v) for v in _values(xmp, "DigitalSourceType")]
    if sources:
        declares = _declares(sources)
        words = {"ai_generated": "declares this image AI-generated",
                 "ai_composite": "declares a composite that includes AI-generated content",
                 "captured": "declares a capture", "other": "declares another source type"}
        found.append(Finding("xmp", "XMP Iptc4xmpExt:DigitalSourceType",
                             "The XMP metadata %s (IPTC digital source type %s). It is not "
                             "signed: anyone can write or remove it."
                             % (words[declares], ", ".join(sources)), declares,
                             details={"digital_source_types": sources}))
    for tool in _values(xmp, "CreatorTool"):
        name = generator_named(tool)
        if name:
            found.append(Finding("xmp", "XMP xmp:CreatorTool", "The XMP creator tool is %r, "
                                 "which names the image generator %s." % (_clip(tool), name),
                                 "ai_generated", name, {"value": _clip(tool)}))
    return found


def _values(tree: Any, key: str) -> list[str]:
    """Every string under ``key`` anywhere in Pillow's nested XMP dict (attribute or element,
    single value or rdf list)."""
    out: list[str] = []

    def strings(node: Any) -> Iterable[str]:
        if isinstance(node, str):
            yield node.strip()
        elif isinstance(node, dict):
            for value in node.values():
                yield from strings(value)
        elif isinstance(node, list):
            for value in node:
                yield from strings(value)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == key:
                    out.extend(s for s in strings(v) if s)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(tree)
    return out


def generator_named(text: str) -> Optional[str]:
    """The generator name from :data:`GENERATOR_NAMES` that ``text`` contains, if any."""
    match = _GENERATOR_RE.search(text or "")
    return match.group(1) if match else None


def _png_text(image: Image.Image) -> list[Finding]:
    try:
        chunks = dict(getattr(image, "text", {}) or {})
    except Exception:  # a damaged text chunk
        return []
    found = []
    for key, raw in chunks.items():
        value = raw if isinstance(raw, str) else str(raw)
        where = "PNG text chunk %r" % _clip(key, 40)
        lowered = key.lower()
        parsed = _json(value)
        if lowered == "parameters":
            if _A1111_RE.search(value):
                found.append(Finding("png_text", where, "Generation settings in the "
                                     "AUTOMATIC1111 / Forge format: prompt %r with %s."
                                     % (_clip(value.split("\n")[0]), _settings_words(value)),
                                     "ai_generated", "AUTOMATIC1111-compatible web UI",
                                     {"text": _clip(value, 400)}))
            elif isinstance(parsed, dict) and ("prompt" in parsed or "steps" in parsed):
                found.append(Finding("png_text", where, "Generation settings as JSON (the "
                                     "format Fooocus writes): prompt %r."
                                     % _clip(str(parsed.get("prompt", ""))), "ai_generated",
                                     "Fooocus-style generator", {"keys": sorted(parsed)[:20]}))
        elif lowered in ("prompt", "workflow") and _comfy_graph(parsed):
            found.append(Finding("png_text", where, "A ComfyUI node graph (%d nodes) that "
                                 "describes how the image was generated." % _node_count(parsed),
                                 "ai_generated", "ComfyUI",
                                 {"nodes": _node_count(parsed)}))
        elif lowered in ("invokeai_metadata", "invokeai_graph", "sd-metadata", "dream"):
            found.append(Finding("png_text", where, "InvokeAI generation metadata (%s)."
                                 % _clip(value, 120), "ai_generated", "InvokeAI",
                                 {"text": _clip(value, 400)}))
        elif lowered == "comment" and isinstance(parsed, dict) and "steps" in parsed and \
                "NovelAI" in str(chunks.get("Software", "")):
            found.append(Finding("png_text", where, "NovelAI generation settings (prompt %r)."
                                 % _clip(str(parsed.get("prompt", ""))), "ai_generated",
                                 "NovelAI", {"keys": sorted(parsed)[:20]}))
        elif lowered in ("software", "source"):
            name = generator_named(value)
            if name:
                found.append(Finding("png_text", where, "The PNG text %r names the image "
                                     "generator %s." % (_clip(value), name), "ai_generated",
                                     name, {"value": _clip(value)}))
    return found


def _exif(image: Image.Image) -> list[Finding]:
    try:
        exif = image.getexif()
        software = exif.get(_SOFTWARE)
        comment = exif.get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    except Exception:  # damaged EXIF: nothing usable
        return []
    found = []
    if isinstance(software, bytes):
        software = software.decode("utf-8", "replace")
    if isinstance(software, str):
        name = generator_named(software)
        if name:
            found.append(Finding("exif", "EXIF Software (0x0131)", "The EXIF Software field is "
                                 "%r, which names the image generator %s. It is not signed: "
                                 "anyone can write or remove it." % (_clip(software), name),
                                 "ai_generated", name, {"value": _clip(software)}))
    text = _user_comment(comment)
    if text and _A1111_RE.search(text) and "Steps" in text:
        found.append(Finding("exif", "EXIF UserComment (0x9286)", "Generation settings in the "
                             "AUTOMATIC1111 / Forge format: prompt %r with %s."
                             % (_clip(text.split("\n")[0]), _settings_words(text)),
                             "ai_generated", "AUTOMATIC1111-compatible web UI",
                             {"text": _clip(text, 400)}))
    return found


def _user_comment(value: Any) -> Optional[str]:
    """EXIF UserComment: 8 bytes of character code, then the text (ASCII or UTF-16)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, bytes) or len(value) < 8:
        return None
    code, body = value[:8], value[8:]
    if code.startswith(b"UNICODE"):
        for encoding in ("utf-16-be", "utf-16-le"):
            try:
                text = body.decode(encoding)
                if text.isprintable() or "\n" in text:
                    return text
            except UnicodeDecodeError:
                continue
    return body.decode("utf-8", "replace")


def _settings_words(text: str) -> str:
    keys = [m.group(1) for m in _A1111_RE.finditer(text)]
    return "settings " + ", ".join(dict.fromkeys(keys)) if keys else "settings"


def _json(value: str) -> Any:
    value = value.strip()
    if not value.startswith(("{", "[")):
        return None
    try:
        return json.loads(value)
    except ValueError:
        return None


def _comfy_graph(parsed: Any) -> bool:
    if isinstance(parsed, dict) and isinstance(parsed.get("nodes"), list):
        return True  # the "workflow" chunk: the editor's graph
    return isinstance(parsed, dict) and bool(parsed) and all(
        isinstance(v, dict) and "class_type" in v for v in parsed.values())  # "prompt": API graph


def _node_count(parsed: Any) -> int:
    if isinstance(parsed, dict) and isinstance(parsed.get("nodes"), list):
        return len(parsed["nodes"])
    return len(parsed) if isinstance(parsed, dict) else 0


def _clip(text: str, limit: int = MAX_QUOTE) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"
