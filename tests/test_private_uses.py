"""The private internals gram-ray relies on (gram_ray/private_uses.py) are all still there in the locked
versions, and the list names every module of gram-ray's that reaches into one."""

import ast
from pathlib import Path

from gram_ray.private_uses import PRIVATE_USES, problems

PACKAGE = Path(__file__).resolve().parents[1] / "gram_ray"


def test_every_private_use_is_still_there_in_the_locked_versions():
    assert problems() == []


def test_every_module_that_imports_a_private_internal_is_in_the_list():
    listed = {use.where.split(" ")[0] for use in PRIVATE_USES}
    users = set()
    for path in PACKAGE.rglob("*.py"):
        if path.name == "private_uses.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any("._private" in n or "._internal" in n for n in names if n.startswith(("ray", "pyarrow"))):
                users.add(path.relative_to(PACKAGE).as_posix())
    assert users <= listed, f"not in gram_ray/private_uses.py: {sorted(users - listed)}"


def test_a_private_use_that_is_gone_is_named():
    from gram_ray import private_uses

    def gone():
        raise AttributeError("module 'ray._private.worker' has no attribute 'print_to_stdstream'")

    original = private_uses.PRIVATE_USES
    private_uses.PRIVATE_USES = (private_uses.PrivateUse("cli/ray_noise.py", "print_to_stdstream", "why", gone),)
    try:
        assert problems() == [
            "cli/ray_noise.py: print_to_stdstream: AttributeError module 'ray._private.worker' has no attribute "
            "'print_to_stdstream'"
        ]
    finally:
        private_uses.PRIVATE_USES = original
