"""handlers/kserve_server.py's check of the kserve version: the module uses KServe's private API, so another
kserve release is refused at start in one line, and every method that touches that API checks it too.

kserve and tritonclient both register protobuf's package `inference`: what imports kserve runs in a fresh
interpreter here."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys

from helpers import ROOT, assert_one_line_error

SERVER = ROOT / "handlers" / "kserve_server.py"


def pinned_version() -> str:
    """KSERVE_VERSION as the module writes it, read without importing kserve."""
    for node in ast.parse(SERVER.read_text()).body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["KSERVE_VERSION"]:
            return node.value.value
    raise AssertionError("no KSERVE_VERSION in handlers/kserve_server.py")


def in_a_fresh_process(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_another_kserve_version_is_one_line_at_start_and_exit_1(tmp_path):
    (tmp_path / "store").mkdir()  # an empty store: had the check not stopped main, it would say so instead
    code = ("import sys; import handlers.kserve_server as server; "
            "server.installed_kserve_version = lambda: '0.22.1'; sys.exit(server.main(sys.argv[1:]))")
    result = in_a_fresh_process(code, "--model_store", str(tmp_path / "store"))
    assert result.returncode == 1
    assert_one_line_error(result, "kserve 0.22.1 is installed", f"kserve {pinned_version()}",
                          f"pip install kserve=={pinned_version()}", "update handlers/kserve_server.py")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_the_methods_on_kserves_private_api_check_the_version_themselves():
    code = """
import asyncio
import handlers.kserve_server as server
from handlers.errors import UserError
server.installed_kserve_version = lambda: "0.19.0"
calls = {
    "KitModelServer.start": lambda: server.KitModelServer.start(None, []),
    "LoopbackGRPCServer.start": lambda: asyncio.run(server.LoopbackGRPCServer.start(None, 1)),
    "KitRESTServer._add_middlewares": lambda: server.KitRESTServer._add_middlewares(None, None),
    "KitRESTServer._add_exception_handlers": lambda: server.KitRESTServer._add_exception_handlers(None, None),
}
for name, call in calls.items():
    try:
        call()
    except UserError as error:
        assert "kserve 0.19.0 is installed" in str(error), (name, error)
    else:
        raise AssertionError(name + " ran on another kserve version")
print("refused", len(calls))
"""
    result = in_a_fresh_process(code)
    assert result.returncode == 0 and result.stdout.split() == ["refused", "4"], result.stderr


def test_every_use_of_a_private_kserve_member_sits_in_a_method_that_checks_the_version():
    """A private member: `self._x` or `super()._x` in the kit's subclasses of KServe's classes."""
    unchecked = []
    for node in ast.walk(ast.parse(SERVER.read_text())):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        checked = any(isinstance(d, ast.Name) and d.id == "kserve_private_api" for d in node.decorator_list)
        private = {a.attr for a in ast.walk(node) if isinstance(a, ast.Attribute)
                   and re.fullmatch(r"_[a-z]\w*", a.attr) and not checked}
        if private or (re.fullmatch(r"_[a-z]\w*", node.name) and not checked):
            unchecked.append((node.name, sorted(private)))
    assert unchecked == []


def test_the_pinned_version_is_the_one_installed_and_required():
    version = pinned_version()
    assert importlib.metadata.version("kserve") == version  # else make serve-kserve refuses to start
    for requirements in ("requirements.txt", "docker/requirements-serve.txt"):
        assert f"kserve=={version}\n" in (ROOT / requirements).read_text(), requirements
