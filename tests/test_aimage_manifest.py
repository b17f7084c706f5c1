import json

import pytest

from clowderd.aimage import mediatypes as mt
from clowderd.aimage.config import canonical_json
from clowderd.aimage.manifest import Descriptor, build_manifest, model_digest, parse_manifest
from clowderd.errors import InvalidInput


def dg(c):
    return "sha256:" + c * 64


CONFIG = Descriptor(mt.AIMAGE_CONFIG, dg("c"), 2)
WEIGHTS = Descriptor(mt.MODEL_WEIGHT, dg("1"), 100, {mt.ANNOTATION_FILEPATH: "model.safetensors"})
CFG_JSON = Descriptor(mt.MODEL_WEIGHT_CONFIG, dg("2"), 10, {mt.ANNOTATION_FILEPATH: "config.json"})
README = Descriptor(mt.MODEL_DOC, dg("3"), 5, {mt.ANNOTATION_FILEPATH: "README.md"})
MODEL = [WEIGHTS, CFG_JSON, README]
BASE = model_digest(MODEL)


def ep(name, media_type, path, digest, base=BASE):
    return Descriptor(media_type, digest, 7, {mt.ANNOTATION_FILEPATH: path, mt.ANNOTATION_EP_NAME: name,
                                              mt.ANNOTATION_EP_BASE: base})


FRENCH = [ep("french", mt.EP_WEIGHT, "adapter_model.safetensors", dg("4")),
          ep("french", mt.EP_CONFIG, "adapter_config.json", dg("5"))]


def test_build_manifest_is_canonical_oci_image_manifest_without_timestamps():
    data = build_manifest(CONFIG, MODEL + FRENCH, {"org.opencontainers.image.description": "tiny"})
    obj = json.loads(data)
    assert data == canonical_json(obj)
    assert obj["schemaVersion"] == 2 and obj["mediaType"] == mt.OCI_MANIFEST
    assert obj["artifactType"] == mt.AIMAGE_ARTIFACT
    assert obj["config"] == {"mediaType": mt.AIMAGE_CONFIG, "digest": dg("c"), "size": 2}
    assert "created" not in data.decode()


def test_build_manifest_does_not_depend_on_layer_order():
    assert build_manifest(CONFIG, MODEL + FRENCH, {}) == build_manifest(CONFIG, list(reversed(FRENCH + MODEL)), {})


def test_parse_manifest_round_trips_and_groups_layers():
    m = parse_manifest(build_manifest(CONFIG, MODEL + FRENCH, {"k": "v"}), "m.json")
    assert m.config == CONFIG and m.annotations == {"k": "v"}
    assert [d.filepath for d in m.model_layers] == ["README.md", "config.json", "model.safetensors"]
    assert list(m.ep_layers) == ["french"]
    assert {d.filepath for d in m.ep_layers["french"]} == {"adapter_model.safetensors", "adapter_config.json"}
    assert m.model_digest == BASE


def test_descriptor_json_round_trip():
    d = Descriptor(mt.MODEL_WEIGHT, dg("a"), 3, {"x": "y"}, artifact_type="application/x")
    assert Descriptor.from_json(d.to_json(), "d") == d
    assert "annotations" not in Descriptor(mt.MODEL_WEIGHT, dg("a"), 3).to_json()


def test_model_digest_ignores_config_docs_and_order_but_not_weights():
    assert model_digest([CFG_JSON, WEIGHTS]) == model_digest([WEIGHTS, CFG_JSON, README])
    changed = Descriptor(mt.MODEL_WEIGHT, dg("9"), 100, {mt.ANNOTATION_FILEPATH: "model.safetensors"})
    assert model_digest([changed, CFG_JSON]) != BASE
    other_config = Descriptor(mt.AIMAGE_CONFIG, dg("d"), 2)
    a = parse_manifest(build_manifest(CONFIG, MODEL, {}), "a")
    b = parse_manifest(build_manifest(other_config, MODEL, {}), "b")
    assert a.model_digest == b.model_digest


def test_adapter_built_for_another_base_is_refused():
    other = [ep("french", mt.EP_WEIGHT, "adapter_model.safetensors", dg("4"), base=dg("f")),
             ep("french", mt.EP_CONFIG, "adapter_config.json", dg("5"), base=dg("f"))]
    with pytest.raises(InvalidInput, match=f"adapter 'french' was built for base {dg('f')}, but this aimage's model is"):
        build_manifest(CONFIG, MODEL + other, {})


def manifest_obj(**changes):
    obj = json.loads(build_manifest(CONFIG, MODEL + FRENCH, {}))
    obj.update(changes)
    return obj


def with_layer(i, **changes):
    obj = manifest_obj()
    obj["layers"][i] = {**obj["layers"][i], **changes}
    return obj


@pytest.mark.parametrize("obj, message", [
    (manifest_obj(schemaVersion=1), "m.json: schemaVersion: must be 2"),
    (manifest_obj(mediaType="application/vnd.docker.distribution.manifest.v2+json"), "m.json: mediaType:"),
    (manifest_obj(artifactType="application/vnd.cncf.model.manifest.v1+json"), "m.json: artifactType: this is not an aimage"),
    (manifest_obj(config={"mediaType": "application/json", "digest": dg("c"), "size": 2}), "m.json: config.mediaType"),
    (manifest_obj(layers={}), "m.json: layers: must be an array"),
    (manifest_obj(layers=[]), "at least one model layer"),
    (with_layer(0, digest="sha256:abc"), "m.json: layers[0].digest: 'sha256:abc': a sha256 digest has 64 hex digits"),
    (with_layer(0, size=-1), "m.json: layers[0].size: must be a non-negative integer"),
    (with_layer(0, mediaType="application/x-python"), "m.json: layers[0].mediaType: unknown layer type"),
    (with_layer(0, annotations={}), "m.json: layers[0]: org.cncf.model.filepath annotation is missing"),
    (with_layer(0, annotations={mt.ANNOTATION_FILEPATH: "../etc/passwd"}), "must be a relative path inside"),
    (with_layer(0, annotations={mt.ANNOTATION_FILEPATH: "/etc/passwd"}), "must be a relative path inside"),
    (with_layer(0, annotations={mt.ANNOTATION_FILEPATH: "config.json"}), "config.json appears twice"),
    (with_layer(3, annotations={mt.ANNOTATION_FILEPATH: "x", mt.ANNOTATION_EP_BASE: BASE}), "layers[3]: org.clowder.ep.name"),
    (with_layer(3, annotations={mt.ANNOTATION_FILEPATH: "x", mt.ANNOTATION_EP_NAME: "french"}), "org.clowder.ep.base annotation is missing"),
])
def test_parse_manifest_rejects_with_source_and_field(obj, message):
    with pytest.raises(InvalidInput) as info:
        parse_manifest(json.dumps(obj).encode(), "m.json")
    assert message in str(info.value)


def test_adapter_needs_config_and_weights():
    with pytest.raises(InvalidInput, match="adapter 'french' needs both"):
        build_manifest(CONFIG, MODEL + FRENCH[:1], {})


def test_parse_manifest_rejects_non_json():
    with pytest.raises(InvalidInput, match="m.json: not valid JSON"):
        parse_manifest(b"\xff", "m.json")
