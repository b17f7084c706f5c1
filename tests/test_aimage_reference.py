import pytest
from hypothesis import given, strategies as st

from clowderd.aimage.reference import Reference, parse_reference, validate_digest
from clowderd.errors import InvalidInput

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text, expected", [
    ("smollm2:135m", Reference(None, "smollm2", "135m")),
    ("library/smollm2", Reference(None, "library/smollm2")),
    ("ghcr.io/acme/smollm2:v1", Reference("ghcr.io", "acme/smollm2", "v1")),
    ("localhost:5000/smollm2@" + DIGEST, Reference("localhost:5000", "smollm2", None, DIGEST)),
    ("localhost/a/b:t@" + DIGEST, Reference("localhost", "a/b", "t", DIGEST)),
    ("my-org__x/a.b_c--d", Reference(None, "my-org__x/a.b_c--d")),
])
def test_parse_reference_splits_registry_repository_tag_digest(text, expected):
    assert parse_reference(text) == expected
    assert str(parse_reference(text)) == text


def test_tag_defaults_to_latest():
    assert parse_reference("smollm2").tag_or_default == "latest"
    assert parse_reference("smollm2:135m").tag_or_default == "135m"


@pytest.mark.parametrize("text, message", [
    ("../x", "'../x': path components are not allowed in a name"),
    ("a/../x", "path components are not allowed"),
    ("UPPER", "'UPPER': repository name must be lowercase"),
    ("", "reference is empty"),
    ("x:-bad", "bad tag '-bad'"),
    ("x:" + "a" * 129, "bad tag"),
    ("x@sha256:abc", "64 hex digits, this one has 3"),
    ("x@sha256:" + "g" * 64, "lowercase hex"),
    ("x@md5:" + "a" * 32, "unsupported digest algorithm 'md5'"),
    ("a//b", "empty component"),
    ("a-/b", "bad name component 'a-'"),
    ("host:99999/x", "bad registry port"),
    ("x/" + "a" * 255, "at most 255"),
])
def test_parse_reference_rejects_with_a_clear_message(text, message):
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_reference(text)


def test_validate_digest_accepts_sha256_and_returns_it():
    assert validate_digest(DIGEST) == DIGEST
    with pytest.raises(InvalidInput, match="not a digest"):
        validate_digest("abc")


_component = st.from_regex(r"[a-z0-9]{1,4}((\.|_|__|-+)[a-z0-9]{1,4}){0,2}", fullmatch=True)
_plain_first = st.from_regex(r"[a-z0-9]{1,4}((_|__|-+)[a-z0-9]{1,4}){0,2}", fullmatch=True).filter(
    lambda c: c != "localhost")
_registry = st.from_regex(r"[a-z0-9]{1,5}(\.[a-z0-9]{1,5}){1,2}(:[1-9][0-9]{0,3})?", fullmatch=True)
_tag = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,20}", fullmatch=True)
_digest = st.from_regex(r"sha256:[0-9a-f]{64}", fullmatch=True)


@given(registry=st.none() | _registry, first=_plain_first, rest=st.lists(_component, max_size=3),
       tag=st.none() | _tag, digest=st.none() | _digest)
def test_reference_round_trips_through_text(registry, first, rest, tag, digest):
    ref = Reference(registry, "/".join([first, *rest]), tag, digest)
    assert parse_reference(str(ref)) == ref
