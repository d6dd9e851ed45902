"""The verdict rules R1-R3 (deepfake/verdict.py) as properties over generated evidence."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

import service_images  # noqa: F401  (puts python/ on sys.path)
from deepfake.provenance import Finding
from deepfake.verdict import (ABSENCE_NOTE, NO_TRACES_HEADLINE, RESAMPLING_HEADLINE,
                              TRACES_HEADLINE, SignalSummary, combine, strength)

DECLARES = ("ai_generated", "ai_composite", "captured", "other", "unreadable")
PLACES = (("c2pa", "C2PA manifest store (active manifest urn:x)"),
          ("xmp", "XMP Iptc4xmpExt:DigitalSourceType"), ("xmp", "XMP xmp:CreatorTool"),
          ("png_text", "PNG text chunk 'parameters'"), ("exif", "EXIF Software (0x0131)"),
          ("exif", "EXIF UserComment (0x9286)"))


@st.composite
def findings(draw) -> Finding:
    source, where = draw(st.sampled_from(PLACES))
    declares = draw(st.sampled_from(DECLARES))
    details = {}
    if source == "c2pa":
        valid = draw(st.booleans())
        details = {"validation": {"signature_valid": valid,
                                  "issuer_trusted": valid and draw(st.booleans())},
                   "signature": {"issuer": draw(st.sampled_from(["Org A", "Org B"]))},
                   "claim_generator": "Tool 1", "trust_list": "none configured",
                   "digital_source_types": []}
    tool = draw(st.sampled_from([None, "GenX", "GenY"]))
    return Finding(source, where, "says something", declares, tool, details)


STATUSES = ["traces_found", "no_traces_found", "inconclusive"]
# the spectral signal's status and reason, and the resampling signal's status
signals = st.builds(SignalSummary, st.sampled_from(STATUSES),
                    st.sampled_from([None, "too small", "noise"]), st.sampled_from(STATUSES))
evidence = st.lists(findings(), max_size=5)


def trusted_capture(f: Finding) -> bool:
    return f.declares == "captured" and f.source == "c2pa" and strength(f) == 6


@settings(max_examples=300)
@given(evidence, signals)
def test_the_rules_in_order(items, signal) -> None:
    decision = combine(items, signal)
    if any(f.declares in ("ai_generated", "ai_composite") for f in items):
        assert (decision.verdict, decision.rule, decision.basis) == ("declared_ai", "R1",
                                                                     "provenance")
    elif any(trusted_capture(f) for f in items):
        assert (decision.verdict, decision.rule) == ("declared_capture", "R2")
    else:
        assert decision.rule == "R3" and decision.basis == "signal"
        if "traces_found" in (signal.status, signal.resampling):  # either signal's traces
            assert decision.verdict == "upsampling_traces"
        else:  # the resampling signal's absence never settles an inconclusive reading
            assert decision.verdict == {"no_traces_found": "no_traces_found",
                                        "inconclusive": "inconclusive"}[signal.status]


@settings(max_examples=300)
@given(evidence, signals)
def test_never_ai_from_the_signal_alone(items, signal) -> None:
    decision = combine(items, signal)
    if decision.verdict != "declared_ai":
        assert "AI-generated" not in decision.headline and "by AI" not in decision.headline
    if decision.verdict == "upsampling_traces":
        # the spectral signal's words when it found traces; else the resampling signal's
        assert decision.headline == (TRACES_HEADLINE if signal.status == "traces_found"
                                     else RESAMPLING_HEADLINE)
        assert "ordinary enlargement" in decision.headline or \
            "ordinary resizing" in decision.headline
    if decision.verdict == "no_traces_found":
        assert decision.headline == NO_TRACES_HEADLINE and "not show" in decision.headline


@settings(max_examples=200)
@given(signals)
def test_no_metadata_says_absence_proves_nothing(signal) -> None:
    decision = combine([], signal)
    assert ABSENCE_NOTE in decision.notes and decision.basis == "signal"


@settings(max_examples=200)
@given(evidence, signals, findings())
def test_an_ai_declaration_always_wins_and_is_named(items, signal, extra) -> None:
    extra = Finding(extra.source, extra.where, extra.says, "ai_generated", "GenZ",
                    extra.details)
    decision = combine(items + [extra], signal)
    assert decision.verdict == "declared_ai"
    best = max([f for f in items + [extra] if f.declares in ("ai_generated", "ai_composite")],
               key=strength)
    # the headline names the strongest item: its issuer (C2PA), its place or its tool
    if best.source == "c2pa":
        assert best.details["signature"]["issuer"] in decision.headline
    elif best.where == "XMP Iptc4xmpExt:DigitalSourceType":
        assert "XMP" in decision.headline
    else:
        assert best.where in decision.headline


@settings(max_examples=200)
@given(st.lists(findings().filter(lambda f: f.declares == "captured"), min_size=1, max_size=3),
       signals)
def test_an_untrusted_capture_claim_is_reported_not_relied_on(items, signal) -> None:
    decision = combine(items, signal)
    weak = [f for f in items if not trusted_capture(f)]
    assert len([n for n in decision.notes if "declares a capture, but" in n]) == len(weak)
    assert (decision.verdict == "declared_capture") == any(trusted_capture(f) for f in items)


@settings(max_examples=200)
@given(evidence, signals)
def test_resampling_traces_alone_name_resizing_never_ai(items, signal) -> None:
    signal = SignalSummary("no_traces_found" if signal.status == "traces_found"
                           else signal.status, signal.reason, "traces_found")
    decision = combine([f for f in items if f.declares not in ("ai_generated",
                                                               "ai_composite")], signal)
    if decision.rule == "R3":
        assert decision.verdict == "upsampling_traces"
        assert decision.headline == RESAMPLING_HEADLINE
        assert "resampling traces found" in decision.headline
        assert "also by ordinary resizing" in decision.headline
    else:  # a trusted capture: the resizing is a note, not the verdict
        assert decision.verdict == "declared_capture"
        assert any("resized after capture" in n for n in decision.notes)
