"""Serving end to end with real processes: one clowderd with all four roles and `--deploy` answers the
official openai client; and an lb in front of a worker keeps answering, every call, while the controller
is killed and restarted."""
from __future__ import annotations

import signal
import threading
import time

import openai

from tests.cluster_fixtures import start_node, wait_for
from tests.test_controller_deployments import start_controller
from tests.worker_fixtures import build_chat_image

QUESTION = [{"role": "user", "content": "Hello there"}]


def lb_client(proc) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{proc.config['lb']['http_listen']}/v1", api_key="none", max_retries=0)


def answers(client: openai.OpenAI, model: str) -> bool:
    try:
        return bool(client.chat.completions.create(model=model, messages=QUESTION, max_tokens=4,
                                                   temperature=0).choices[0].message.content)
    except openai.APIError:
        return False


def test_one_clowderd_with_all_roles_serves_a_deployment_given_on_its_command_line(clowderd, tmp_path_factory):
    data = tmp_path_factory.mktemp("node") / "data"
    build_chat_image(data / "store", tmp_path_factory.mktemp("models"), "tiny-chat:v1")
    proc = clowderd(config_extra={"data_dir": str(data)}, args=["--deploy", "chat=tiny-chat:v1"])
    client = lb_client(proc)
    wait_for("the deployment answers through the lb", lambda: answers(client, "chat"), timeout=120)
    assert [m.id for m in client.models.list().data] == ["chat"]
    streamed = client.chat.completions.create(model="chat", messages=QUESTION, max_tokens=6, temperature=0,
                                              stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens > 0
    assert proc.stop() == 0


def test_no_call_fails_while_the_controller_is_killed_and_restarted(clowderd, tmp_path_factory):
    data = tmp_path_factory.mktemp("controller") / "data"
    build_chat_image(data / "store", tmp_path_factory.mktemp("models"), "tiny-chat:v1")
    controller = start_controller(clowderd, data, args=["--deploy", "chat=tiny-chat:v1"])
    lb = start_node(clowderd, controller, "w1", ("worker", "lb"))
    client = lb_client(lb)
    wait_for("the deployment answers through the lb", lambda: answers(client, "chat"), timeout=120)

    results: list[bool] = []
    stop = threading.Event()

    def call_forever():
        while not stop.is_set():
            results.append(answers(client, "chat"))

    caller = threading.Thread(target=call_forever)
    caller.start()
    try:
        time.sleep(1.0)
        controller.send_signal(signal.SIGKILL)
        controller.wait()
        time.sleep(1.0)
        start_controller(clowderd, data, controller={"listen": controller.addresses["controller"],
                                                     "cluster_listen": controller.addresses["cluster"]},
                         storage={"listen": controller.addresses["storage"]})
        time.sleep(1.5)
    finally:
        stop.set()
        caller.join(30)
    assert len(results) > 10 and all(results), f"{results.count(False)} of {len(results)} calls failed"
