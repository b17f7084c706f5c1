"""`clowderctl apikey`: keys are printed once, stored as digests in a 0600 file the lb reads."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

from clowderd.middleware.auth import KeyRing


def clowderctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clowderctl.main", *args], capture_output=True, text=True,
                          timeout=60)


def test_created_keys_authenticate_their_user_and_revoked_users_lose_them(tmp_path):
    keys = tmp_path / "etc" / "lb-keys.toml"
    first = clowderctl("apikey", "create", "alice", "--keys-file", str(keys), "--group", "research")
    second = clowderctl("apikey", "create", "alice", "--keys-file", str(keys), "--group", "ops",
                        "--requests-per-minute", "30")
    bob = clowderctl("apikey", "create", "bob", "--keys-file", str(keys))
    assert first.returncode == second.returncode == bob.returncode == 0, first.stderr + second.stderr
    key1, key2 = first.stdout.strip(), second.stdout.strip()
    assert key1.startswith("ck-") and key1 != key2 and key1 not in keys.read_text()
    assert stat.S_IMODE(os.stat(keys).st_mode) == 0o600
    ring = KeyRing(keys)
    assert ring.lookup(key1).name == ring.lookup(key2).name == "alice"
    assert ring.lookup(key1).groups == {"research", "ops"} and ring.lookup(key1).requests_per_minute == 30

    listed = json.loads(clowderctl("apikey", "list", "--keys-file", str(keys), "-o", "json").stdout)
    assert listed == [{"user": "alice", "groups": ["ops", "research"], "keys": 2, "requests_per_minute": 30},
                      {"user": "bob", "groups": [], "keys": 1, "requests_per_minute": None}]

    assert clowderctl("apikey", "revoke", "alice", "--keys-file", str(keys)).returncode == 0
    ring = KeyRing(keys)
    assert ring.lookup(key1) is None and ring.lookup(bob.stdout.strip()).name == "bob"
    missing = clowderctl("apikey", "revoke", "alice", "--keys-file", str(keys))
    assert missing.returncode == 1 and "no user 'alice'" in missing.stderr and "bob" in missing.stderr


def test_a_bad_user_name_or_keys_file_is_refused_and_the_file_left_alone(tmp_path):
    keys = tmp_path / "keys.toml"
    bad = clowderctl("apikey", "create", "al ice", "--keys-file", str(keys))
    assert bad.returncode == 1 and "user name 'al ice'" in bad.stderr and not keys.exists()
    keys.write_text('[users.a]\nkeys = ["plain-key"]\n')
    broken = clowderctl("apikey", "create", "b", "--keys-file", str(keys))
    assert broken.returncode == 1 and "users.a.keys" in broken.stderr
    assert keys.read_text() == '[users.a]\nkeys = ["plain-key"]\n'
