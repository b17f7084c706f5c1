"""The hash-chained audit log: records written by the Audit middleware, a chain that survives restarts,
`verify` naming the first tampered record, and `clowderctl audit verify`."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from clowderd.errors import InvalidInput
from clowderd.middleware import audit
from clowderd.middleware.audit import GENESIS, Audit, AuditLog, create, verify
from clowderd.middleware.base import Call, Outcome


def chat_call(content: str = "hello", **kw) -> Call:
    return Call(method="chat", model="m", messages=[{"role": "user", "content": content}], client="127.0.0.1:5000",
                **kw)


def answered(text: str = "hi there") -> Outcome:
    return Outcome(status=200, texts=[text], finish_reasons=["stop"],
                   usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}, replica="r1", seconds=0.01)


def write_calls(path: Path, count: int, first: int = 0) -> None:
    """`count` answered calls through the Audit middleware, on a log opened and closed around them."""
    audit_log = AuditLog(path)
    middleware = Audit(audit_log)

    async def calls():
        for i in range(first, first + count):
            await middleware.on_outcome(chat_call(f"question {i}", principal="alice"), answered(f"answer {i}"))

    asyncio.run(calls())
    audit_log.close()


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def clowderctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clowderctl.main", *args], capture_output=True, text=True,
                          timeout=60)


def test_each_call_becomes_a_chained_record_with_digests_not_texts(tmp_path):
    path = tmp_path / "audit" / "calls.log"
    audit_log = AuditLog(path)
    middleware = Audit(audit_log)
    refused = Outcome(status=401, texts=[""], finish_reasons=[""], usage=None, error="auth: the API key is not valid")

    async def calls():
        await middleware.on_outcome(chat_call("what is 2+2?", principal="alice"), answered("4"))
        await middleware.on_outcome(Call(method="completion", model="m", prompt="Once upon", client="10.0.0.9:1"),
                                    refused)

    asyncio.run(calls())
    audit_log.close()

    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    text = path.read_text()
    assert "what is 2+2?" not in text and '"4"' not in text and "Once upon" not in text
    first, second = [json.loads(line) for line in lines(path)]
    sha = lambda obj: hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert first["seq"] == 1 and first["prev"] == GENESIS
    assert first["input_sha256"] == sha([{"role": "user", "content": "what is 2+2?"}])
    assert first["output_sha256"] == sha(["4"])
    assert (first["principal"], first["client"], first["method"], first["status"], first["deployment"]) == \
        ("alice", "127.0.0.1:5000", "chat", 200, "m")
    assert first["call_id"].startswith("chatcmpl-") and first["time"].endswith("Z")
    assert first["hash"] == sha({k: v for k, v in first.items() if k != "hash"})
    assert second["seq"] == 2 and second["prev"] == first["hash"]
    assert (second["principal"], second["status"], second["method"]) == (None, 401, "completion")
    assert second["input_sha256"] == sha("Once upon")
    assert verify(path).ok and verify(path).records == 2 and verify(path).last_hash == second["hash"]


@pytest.mark.parametrize("tail_block", [7, audit.TAIL_BLOCK])
def test_a_restarted_log_continues_the_chain(tmp_path, monkeypatch, tail_block):
    monkeypatch.setattr(audit, "TAIL_BLOCK", tail_block)  # 7: the last record is found over many reads
    path = tmp_path / "calls.log"
    write_calls(path, 3)
    write_calls(path, 2, first=3)
    records = [json.loads(line) for line in lines(path)]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert records[3]["prev"] == records[2]["hash"]
    assert verify(path).ok and verify(path).records == 5


def test_concurrent_calls_get_one_record_each_in_one_unbroken_chain(tmp_path):
    path = tmp_path / "calls.log"
    audit_log = AuditLog(path)
    middleware = Audit(audit_log)

    async def calls():
        await asyncio.gather(*(middleware.on_outcome(chat_call(str(i)), answered()) for i in range(500)))

    asyncio.run(calls())
    audit_log.close()
    result = verify(path)
    assert result.ok and result.records == 500
    assert len({json.loads(line)["call_id"] for line in lines(path)}) == 500


def tamper(path: Path, edit) -> None:
    content = lines(path)
    path.write_bytes(b"".join(edit(content)))


def test_a_changed_byte_in_a_record_is_named_by_line_and_seq(tmp_path):
    path = tmp_path / "calls.log"
    write_calls(path, 6)

    def change_principal(content):
        content[3] = content[3].replace(b'"alice"', b'"alicf"')
        return content

    tamper(path, change_principal)
    result = verify(path)
    assert not result.ok and (result.line, result.seq, result.records) == (4, 4, 3)
    assert "hash mismatch" in result.problem


def test_a_changed_byte_in_a_records_hash_is_named(tmp_path):
    path = tmp_path / "calls.log"
    write_calls(path, 4)

    def flip_hash_digit(content):
        line = content[1]
        at = line.index(b'"hash":"') + len(b'"hash":"')
        content[1] = line[:at] + (b"0" if line[at:at + 1] != b"0" else b"1") + line[at + 1:]
        return content

    tamper(path, flip_hash_digit)
    result = verify(path)
    assert (result.ok, result.line, result.seq) == (False, 2, 2) and "hash mismatch" in result.problem


def test_a_record_rehashed_after_an_edit_breaks_the_link_of_the_next(tmp_path):
    path = tmp_path / "calls.log"
    write_calls(path, 4)

    def edit_and_rehash(content):
        record = json.loads(content[1])
        record["status"] = 500
        del record["hash"]
        record["hash"] = hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        content[1] = json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n"
        return content

    tamper(path, edit_and_rehash)
    result = verify(path)
    assert (result.ok, result.line, result.seq) == (False, 3, 3) and "broken prev link" in result.problem


def test_a_deleted_line_is_named_as_a_gap(tmp_path):
    path = tmp_path / "calls.log"
    write_calls(path, 5)
    tamper(path, lambda content: content[:2] + content[3:])
    result = verify(path)
    assert (result.ok, result.line, result.seq, result.records) == (False, 3, 4, 2)
    assert "gap in seq: expected 3, found 4" in result.problem


def test_swapped_lines_are_named_where_the_order_breaks(tmp_path):
    path = tmp_path / "calls.log"
    write_calls(path, 5)
    tamper(path, lambda c: c[:1] + [c[2], c[1]] + c[3:])
    result = verify(path)
    assert (result.ok, result.line, result.seq) == (False, 2, 3) and "out of order" in result.problem


def test_a_torn_last_line_is_reported_and_the_log_will_not_continue_from_it(tmp_path):
    path = tmp_path / "calls.log"
    write_calls(path, 3)
    tamper(path, lambda content: content[:2] + [content[2][:40]])
    result = verify(path)
    assert (result.ok, result.line, result.records) == (False, 3, 2) and "torn last line" in result.problem
    with pytest.raises(InvalidInput, match="calls.log: the last record does not verify .*torn last line"):
        AuditLog(path)
    assert len(lines(path)) == 3  # nothing appended after the torn line


def test_an_unparsable_line_is_named(tmp_path):
    path = tmp_path / "calls.log"
    write_calls(path, 3)
    tamper(path, lambda content: [content[0], b"garbage\n", *content[1:]])
    result = verify(path)
    assert (result.ok, result.line, result.seq) == (False, 2, None) and "unparsable line" in result.problem
    assert result.describe().startswith("tampered: line 2 (after seq 1): unparsable line")


def test_a_log_readable_by_others_or_already_open_elsewhere_is_refused(tmp_path):
    path = tmp_path / "calls.log"
    path.touch(mode=0o644)
    os.chmod(path, 0o644)
    with pytest.raises(InvalidInput, match="calls.log: the audit log has mode 0644.*chmod 600"):
        AuditLog(path)
    os.chmod(path, 0o600)
    first = AuditLog(path)
    try:
        with pytest.raises(InvalidInput, match="another process is writing this audit log"):
            AuditLog(path)
    finally:
        first.close()


def test_the_factory_audits_only_when_the_lb_keeps_an_audit_log(tmp_path):
    audit_log = AuditLog(tmp_path / "calls.log")
    try:
        assert isinstance(create({}, None, SimpleNamespace(audit_log=audit_log)), Audit)
        assert create({}, None, SimpleNamespace(audit_log=None)) is None
    finally:
        audit_log.close()


def test_clowderctl_audit_verify_prints_the_count_or_the_first_tampered_record(tmp_path):
    path = tmp_path / "calls.log"
    write_calls(path, 4)
    good = clowderctl("audit", "verify", str(path))
    assert good.returncode == 0 and good.stdout.startswith("ok: 4 records"), good.stderr
    as_json = json.loads(clowderctl("audit", "verify", str(path), "-o", "json").stdout)
    assert as_json["ok"] is True and as_json["records"] == 4

    tamper(path, lambda content: content[:1] + content[2:])
    bad = clowderctl("audit", "verify", str(path))
    assert bad.returncode == 1 and bad.stdout.startswith("tampered: line 2 (seq 3): gap in seq"), bad.stdout
    bad_json = clowderctl("audit", "verify", str(path), "-o", "json")
    assert bad_json.returncode == 1
    assert {k: json.loads(bad_json.stdout)[k] for k in ("ok", "line", "seq", "records")} == \
        {"ok": False, "line": 2, "seq": 3, "records": 1}
