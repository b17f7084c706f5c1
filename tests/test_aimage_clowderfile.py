import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from clowderd.aimage.clowderfile import load_clowderfile
from clowderd.aimage.config import CONFIG_VERSION
from clowderd.aimage.reference import Reference
from clowderd.errors import InvalidInput


@pytest.fixture
def project(tmp_path):
    model = tmp_path / "SmolLM2-135M-Instruct"
    model.mkdir()
    (model / "config.json").write_text("{}")
    save_file({"w": np.zeros(2, np.float32)}, str(model / "model.safetensors"))
    (tmp_path / "adapters" / "french").mkdir(parents=True)
    return tmp_path


def write(project, text):
    path = project / "Clowderfile"
    path.write_text(text)
    return path


def test_full_clowderfile_resolves_paths_against_its_directory(project):
    path = write(project, """
base: ./SmolLM2-135M-Instruct
adapters:
  - name: french
    path: ./adapters/french
config:
  prompts: {system: "Réponds en français."}
  placement: {gpu_count: 1}
annotations:
  org.opencontainers.image.description: "SmolLM2 that answers in French"
""")
    cf = load_clowderfile(path)
    assert cf.base.kind == "dir" and cf.base.value == (project / "SmolLM2-135M-Instruct").resolve()
    assert [(a.name, a.path) for a in cf.adapters] == [("french", (project / "adapters" / "french").resolve())]
    assert cf.config == {"version": CONFIG_VERSION, "prompts": {"system": "Réponds en français."},
                         "placement": {"gpu_count": 1}}
    assert cf.annotations == {"org.opencontainers.image.description": "SmolLM2 that answers in French"}


def test_minimal_clowderfile_has_default_config(project):
    cf = load_clowderfile(write(project, "base: SmolLM2-135M-Instruct\n"))
    assert cf.base.kind == "dir" and cf.adapters == [] and cf.config == {"version": CONFIG_VERSION}
    assert not cf.config_given


def test_base_reference_and_gguf(project):
    assert load_clowderfile(write(project, "base: smollm2:135m\n")).base.value == Reference(None, "smollm2", "135m")
    (project / "m.gguf").write_bytes(b"GGUF\x03\x00")
    assert load_clowderfile(write(project, "base: m.gguf\n")).base.kind == "gguf"
    (project / "fake.gguf").write_bytes(b"PK\x03\x04")
    with pytest.raises(InvalidInput, match="base: fake.gguf is neither a model directory nor a GGUF file"):
        load_clowderfile(write(project, "base: fake.gguf\n"))


def test_config_file_is_loaded_and_validated(project):
    (project / "aimage-config.json").write_text(json.dumps({"priority": 5}))
    cf = load_clowderfile(write(project, "base: smollm2\nconfig_file: ./aimage-config.json\n"))
    assert cf.config == {"version": CONFIG_VERSION, "priority": 5} and cf.config_given
    (project / "aimage-config.json").write_text(json.dumps({"priority": "high"}))
    with pytest.raises(InvalidInput, match="aimage-config.json: priority: 'high' is not of type 'integer'"):
        load_clowderfile(project / "Clowderfile")


@pytest.mark.parametrize("text, message", [
    ("adapters: []\n", "Clowderfile: base: required"),
    ("bsae: x\n", "Clowderfile: bsae: unknown field (did you mean 'base'?)"),
    ("base: smollm2\nadapters:\n  - name: french\n    pth: ./adapters/french\n",
     "Clowderfile: adapters[0].pth: unknown field (did you mean 'path'?)"),
    ("base: smollm2\nadapters:\n  - name: french\n    path: ./x\n", "Clowderfile: adapters[0].path: ./x does not exist"),
    ("base: smollm2\nadapters:\n  - name: french\n", "Clowderfile: adapters[0].path: required"),
    ("base: smollm2\nadapters:\n  - {name: French, path: ./adapters/french}\n", "Clowderfile: adapters[0].name: 'French' is not a valid adapter name"),
    ("base: smollm2\nadapters:\n  - {name: fr, path: ./adapters/french}\n  - {name: fr, path: ./adapters/french}\n",
     "Clowderfile: adapters[1].name: adapter 'fr' is given twice"),
    ("base: smollm2\nadapters: french\n", "Clowderfile: adapters: must be a list"),
    ("base: smollm2\nconfig: {}\nconfig_file: ./c.json\n", "Clowderfile: config and config_file are mutually exclusive"),
    ("base: smollm2\nconfig:\n  placement: {gpu_cuont: 1}\n", "Clowderfile: config.placement.gpu_cuont: unknown field (did you mean 'gpu_count'?)"),
    ("base: smollm2\nconfig_file: ./c.json\n", "Clowderfile: config_file: ./c.json does not exist"),
    ("base: smollm2\nannotations: {a: 1}\n", "Clowderfile: annotations.a: must be a string, not 1 (quote it)"),
    ("base: ./nothere\n", "Clowderfile: base: ./nothere does not exist"),
    ("base: Not_A_Ref!\n", "Clowderfile: base: 'Not_A_Ref!': repository name must be lowercase (for a directory, write ./Not_A_Ref!)"),
    ("base: 3\n", "Clowderfile: base: must be a path or an aimage reference"),
    ("base: x\nbase: y\n", "Clowderfile: not valid YAML: line 2, column 1: duplicate key 'base'"),
    ("base: [\n", "Clowderfile: not valid YAML: line 2"),
    ("- base\n", "Clowderfile: must be a YAML mapping"),
])
def test_invalid_clowderfile_names_the_key_path(project, text, message):
    with pytest.raises(InvalidInput) as info:
        load_clowderfile(write(project, text))
    assert str(info.value).split("Clowderfile", 1)[1].startswith(message.removeprefix("Clowderfile")), str(info.value)
