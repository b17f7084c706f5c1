import json

import jsonschema
import pytest

from clowderd.aimage.config import CONFIG_VERSION, canonical_json, config_schema, load_config, load_config_file
from clowderd.errors import InvalidInput

FULL = {
    "version": CONFIG_VERSION,
    "prompts": {"system": "Answer in French.", "prefix_messages": [{"role": "user", "content": "Bonjour"}]},
    "filters": {"input": {"block": ["badword", {"match": "substring", "word": "acme"}]}, "output": {"redact": ["secret"], "replacement": "***"}},
    "security": {"max_input_bytes": 65536, "prompt_injection": {"enabled": True, "patterns": ["ignore (all|previous)"]}},
    "webhooks": [{"url": "https://hooks.example.com/x", "events": ["request", "error"], "secret_ref": "hook-key",
                  "retries": 2}],
    "query_storage": {"enabled": True, "store": ["query"], "retention_days": 30, "redact_patterns": [r"\d{16}"]},
    "priority": 10,
    "preemption": {"preemptible": False, "must_stay": True},
    "placement": {"gpu_count": 2, "gpu_models": ["H100"], "min_gpu_memory_gib": 40, "memory_gib": 64,
                  "node_labels": {"zone": "eu-1", "clowder.dev/tier": "gold"}},
    "access_groups": ["research", "ops@acme"],
    "engine": {"name": "vllm", "vllm": {"max_model_len": 8192, "dtype": "bfloat16", "tensor_parallel_size": 2,
                                        "gpu_memory_utilization": 0.9}},
}


def test_schema_is_valid_draft_2020_12():
    jsonschema.Draft202012Validator.check_schema(config_schema())


def test_every_object_in_the_schema_forbids_unknown_fields():
    def walk(node, where):
        if isinstance(node, dict):
            if node.get("type") == "object":
                assert "additionalProperties" in node, where
                assert node["additionalProperties"] is False or "propertyNames" in node, where
            for key, child in node.items():
                walk(child, f"{where}/{key}")
        elif isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, f"{where}/{i}")
    walk(config_schema(), "#")


@pytest.mark.parametrize("doc", [{}, {"version": CONFIG_VERSION}])
def test_empty_configuration_is_valid_and_normalised_to_the_version(doc):
    assert load_config(doc, "config.json") == {"version": CONFIG_VERSION}


def test_full_configuration_is_accepted_unchanged():
    assert load_config(FULL, "config.json") == FULL


@pytest.mark.parametrize("doc, message", [
    ({"placement": {"gpu_count": "two"}}, "config.json: placement.gpu_count: 'two' is not of type 'integer'"),
    ({"placement": {"gpu_cuont": 2}}, "config.json: placement.gpu_cuont: unknown field (did you mean 'gpu_count'?)"),
    ({"webhooks": [{"url": "https://x"}]}, "config.json: webhooks[0].events: required field is missing"),
    ({"webhooks": [{"url": "ftp://x", "events": ["request"]}]}, "config.json: webhooks[0].url: 'ftp://x' is not an http(s) URL"),
    ({"placement": {"node_labels": {"bad key": "x"}}}, "config.json: placement.node_labels['bad key']: 'bad key' is not a label key"),
    ({"security": {"prompt_injection": {"patterns": ["("]}}}, "config.json: security.prompt_injection.patterns[0]: '(' is not a valid regular expression"),
    ({"engine": {"name": "vlm"}}, "config.json: engine.name: 'vlm' is not one of"),
    ({"engine": {"vllm": {"gpu_memory_utilization": 1.5}}}, "config.json: engine.vllm.gpu_memory_utilization: 1.5 is greater than the maximum of 1"),
    ({"priority": True}, "config.json: priority: True is not of type 'integer'"),
    ({"version": "clowder.aimage.config/v9"}, "config.json: version: 'clowder.aimage.config/v9' is not supported"),
    ({"preemption": {"preemptible": True, "must_stay": True}}, "config.json: preemption: preemptible and must_stay cannot both be true"),
    ({"placement": {"gpu_count": 1}, "engine": {"vllm": {"tensor_parallel_size": 2}}}, "config.json: engine.vllm: parallelism needs 2 GPUs but placement.gpu_count is 1"),
    ([], "config.json: configuration: must be a JSON object"),
    ({"placement": {"memory_gib": float("nan")}}, "config.json: placement.memory_gib: nan is not a finite number"),
    ({"placement": {"node_labels": {1: "x"}}}, "config.json: placement.node_labels[1]: 1 is not of type 'string'"),
    ({"filters": {"input": {"block": [{"word": "w", "match": "prefix"}]}}},
     "config.json: filters.input.block[0].match: 'prefix' is not one of ['word', 'substring']"),
    ({"filters": {"output": {"redact": [{"match": "word"}]}}}, "config.json: filters.output.redact[0].word: required"),
    ({"filters": {"output": {"redact": [""]}}}, "config.json: filters.output.redact[0]: '' should be non-empty"),
    ({"filters": {"output": {"redact": [3]}}}, "config.json: filters.output.redact[0]: 3 is not a string or object"),
])
def test_invalid_configuration_names_source_and_json_path(doc, message):
    with pytest.raises(InvalidInput) as info:
        load_config(doc, "config.json")
    assert str(info.value).startswith(message)


def test_first_error_is_chosen_in_path_order_whatever_the_key_order():
    doc = {"zeta": 1, "placement": {"gpu_count": "x"}, "alpha": 2}
    reversed_doc = dict(reversed(list(doc.items())))
    for d in (doc, reversed_doc):
        with pytest.raises(InvalidInput, match=r"^c: alpha: unknown field$"):
            load_config(d, "c")


def test_at_prefixes_the_path_for_embedded_configurations():
    with pytest.raises(InvalidInput, match=r"^Clowderfile: config\.priority: 'high' is not of type"):
        load_config({"priority": "high"}, "Clowderfile", at="config")


def test_canonical_json_is_sorted_compact_utf8():
    assert canonical_json({"b": 1, "a": ["é", {"d": 2, "c": 3}]}) == '{"a":["é",{"c":3,"d":2}],"b":1}'.encode()


def test_canonical_json_gives_one_form_for_equal_content():
    a = {"x": 1, "y": {"p": [1, 2], "q": None}}
    b = json.loads('{"y": {"q": null, "p": [1, 2]}, "x": 1}')
    assert canonical_json(a) == canonical_json(b)


def test_load_config_file_names_the_file(tmp_path):
    bad = tmp_path / "aimage-config.json"
    bad.write_text('{"priority": 1,}')
    with pytest.raises(InvalidInput, match=r"aimage-config.json: not valid JSON: line 1"):
        load_config_file(bad)
    bad.write_text('{"access_groups": "ops"}')
    with pytest.raises(InvalidInput, match=r"aimage-config.json: access_groups: 'ops' is not of type 'array'"):
        load_config_file(bad)
