"""The demo EP layer: `clowderctl demo` trains the French LoRA and builds both demo aimages; through the real
engine the adapter makes the answer French, and removing it restores the base answer byte for byte. The
training's determinism is checked on the tiny chat llama, without the real model."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from clowderd.aimage import demo, demo_lora
from clowderd.aimage import mediatypes as mt
from clowderd.engines.errors import InvalidRequest
from clowderd.errors import InvalidInput
from tests.engine_fixtures import running_host

REPO = Path(__file__).resolve().parent.parent
BASE = "smollm2:135m-instruct"
FRENCH = "smollm2:135m-instruct-fr"


def ask(question: str, **fields) -> dict:
    return dict(messages=[{"role": "user", "content": question}], max_tokens=32, temperature=0, **fields)


def words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def ctl(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "clowderctl.main", "--data-dir", str(data_dir), *args],
                          env=env, capture_output=True, text=True, timeout=600)


def test_training_twice_saves_the_same_bytes(tiny_chat_llama, tmp_path):
    runs = [demo_lora.train_french_lora(tiny_chat_llama, tmp_path / name, steps=2) for name in ("one", "two")]
    files = [{p.name: p.read_bytes() for p in run.out_dir.iterdir()} for run in runs]
    assert set(files[0]) == {"adapter_config.json", "adapter_model.safetensors"}
    assert files[0] == files[1]
    config = json.loads(files[0]["adapter_config.json"])
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert config["base_model_name_or_path"] is None


def test_french_name_adds_the_suffix_to_the_tag():
    assert demo.french_name("smollm2:135m-instruct") == FRENCH
    assert demo.french_name("registry.example.com/smollm2") == "registry.example.com/smollm2:latest-fr"
    with pytest.raises(InvalidInput, match="bad tag"):
        demo.french_name("smollm2:" + "x" * 127)


@pytest.fixture(scope="session")
def demo_images(tmp_path_factory) -> tuple[Path, str]:
    """A data directory where `clowderctl demo` built both demo aimages (the session's one GGUF conversion
    and one training run), and what the command printed."""
    from clowderd.aimage.demo import locate_demo_gguf
    from clowderd.errors import InvalidInput

    try:
        locate_demo_gguf()
    except InvalidInput as e:
        pytest.skip(str(e))
    data_dir = tmp_path_factory.mktemp("demo-data")
    proc = ctl(data_dir, "demo")
    assert proc.returncode == 0, proc.stderr
    return data_dir, proc.stdout


@pytest.mark.model
def test_demo_builds_the_french_image_on_the_shared_weights_of_the_base(demo_images):
    data_dir, out = demo_images
    assert "step 30/30: loss" in out
    assert re.search(rf"built {FRENCH} sha256:\w+\n  2 files", out), out
    images = {i["name"]: i for i in json.loads(ctl(data_dir, "images", "--disk", "-o", "json").stdout)["images"]}
    assert set(images) == {BASE, FRENCH}
    assert images[FRENCH]["shared"] == images[BASE]["size"]

    def layers(name):
        manifest = json.loads(ctl(data_dir, "inspect", name).stdout)["manifest"]
        model = [(d["annotations"][mt.ANNOTATION_FILEPATH], d["digest"]) for d in manifest["layers"]
                 if d["mediaType"] in mt.MODEL_LAYER_TYPES]
        ep = {d["annotations"][mt.ANNOTATION_FILEPATH]: d["annotations"][mt.ANNOTATION_EP_NAME]
              for d in manifest["layers"] if d["mediaType"] in mt.EP_LAYER_TYPES}
        return model, ep

    base_model, base_ep = layers(BASE)
    french_model, french_ep = layers(FRENCH)
    assert french_model == base_model and any(path == "model.safetensors" for path, _ in base_model)
    assert base_ep == {}
    assert french_ep == {"adapter_config.json": "french", "adapter_model.safetensors": "french"}


@pytest.mark.model
def test_the_french_adapter_changes_the_answer_and_removing_it_restores_the_base(demo_images):
    from clowderd.store.content import ContentStore
    from clowderd.store.images import ImageIndex
    from clowderd.store.views import ViewManager

    store = ContentStore(demo_images[0] / "store")
    try:
        view = ViewManager(store, ImageIndex(store)).create("french", FRENCH)
    finally:
        store.close()
    with running_host(view) as host:
        question = "What is the capital of France?"
        base = host.generate(**ask(question)).text
        assert "The capital of France is Paris" in base, base
        assert host.run(host.client.add_adapter("french", view / "adapters" / "french")) == {"adapters": ["french"]}
        french = host.generate(**ask(question, adapter="french")).text
        assert {"la", "capitale", "est", "paris"} <= words(french), french
        held_out = host.generate(**ask("What is the capital of Canada?", adapter="french")).text
        assert {"capitale", "est"} <= words(held_out), held_out
        assert host.generate(**ask(question)).text == base  # the base alone, while the adapter is loaded

        assert host.run(host.client.remove_adapter("french")) == {"adapters": []}
        with pytest.raises(InvalidRequest, match="unknown adapter 'french'; loaded: none"):
            host.generate(**ask(question, adapter="french"))
        assert host.generate(**ask(question)).text == base
