"""clowderctl loads each command's module only when that command runs."""
import subprocess
import sys

import pytest

from clowderctl.main import COMMANDS, module_commands
from tests.clowderd_proc import REPO_ROOT


@pytest.mark.parametrize("module", sorted(set(COMMANDS.values())))
def test_the_command_table_names_exactly_what_each_module_registers(module):
    assert set(module_commands(module)) == {name for name, m in COMMANDS.items() if m == module}


def test_a_command_does_not_import_the_modules_of_the_others():
    code = ("import sys\nfrom clowderctl.main import cli\n"
            "try:\n    cli(['pull', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('clowderctl.images', 'clowderctl.cluster', 'clowderd.aimage.build') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Usage: " in r.stdout and r.stdout.strip().endswith("[]")
