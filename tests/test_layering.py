"""The house's layering, as the README's file map states it: each library module imports only the
modules above it in the map (so there is no import circle, and common.py imports none), and a
script imports library modules, never another script."""
import ast
import os
import re

from conftest import ROOT


def project_imports(path):
    """The project modules a file imports ('tasks' for the package and each of its modules)."""
    names = set()
    for n in ast.walk(ast.parse(open(path).read())):
        if isinstance(n, ast.Import):
            names.update(a.name for a in n.names)
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            names.add(n.module)
    return {x.split(".")[0] for x in names if os.path.exists(os.path.join(ROOT, x.split(".")[0] + ".py"))
            or os.path.isdir(os.path.join(ROOT, x.split(".")[0]))} - {"tests"}


def file_map():
    """(library modules in the map's order, scripts) from the README's Files section."""
    text = open(os.path.join(ROOT, "README.md")).read()
    files = text[text.index("## Files"):]
    lib, scripts = files.split("Scripts (")[:2]
    row = re.compile(r"^\| `([\w/.]+)` \|", re.M)
    return row.findall(lib), row.findall(scripts)


def module_of(entry):
    return entry.split("/")[0].removesuffix(".py")


def test_each_module_imports_only_modules_below_it():
    lib, scripts = file_map()
    order = list(dict.fromkeys(module_of(e) for e in lib))
    assert order[0] == "common"
    on_disk = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")} | {"tasks"}
    assert set(order) | {module_of(s) for s in scripts} == on_disk, "the file map lists every module and script"
    for i, m in enumerate(order):
        paths = [os.path.join(ROOT, "tasks", f) for f in os.listdir(os.path.join(ROOT, "tasks")) if f.endswith(".py")] \
            if m == "tasks" else [os.path.join(ROOT, m + ".py")]
        for p in paths:
            bad = project_imports(p) - set(order[:i]) - {m}
            assert not bad, f"{os.path.relpath(p, ROOT)} imports {sorted(bad)}, which the file map puts above it"


def test_scripts_import_no_script():
    lib, scripts = file_map()
    scripts = {module_of(s) for s in scripts}
    for s in scripts:
        bad = project_imports(os.path.join(ROOT, s + ".py")) & scripts
        assert not bad, f"{s}.py imports the script(s) {sorted(bad)}"
