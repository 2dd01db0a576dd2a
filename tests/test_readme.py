"""The README's quick start is part of the product: exactly two commands, and CI runs the second."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_quick_start_is_exactly_two_commands() -> None:
    commands = quick_start_commands()
    assert len(commands) == 2
    assert all("\n" not in command for command in commands)


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert quick_start_commands()[1] in ci_lines


def test_quick_start_installs_the_project_itself() -> None:
    """Scripts and tools import ``library`` with no ``sys.path`` edits: the project must be installed (editable)."""
    assert all(re.search(r"pip install -e \. ", command) for command in quick_start_commands())
    # bench/dataloader.py's kohya child process puts kohya's own checkout and a torchvision stand-in on sys.path
    # (a foreign project under benchmark, not this one)
    foreign = {ROOT / "bench" / "dataloader.py"}
    for path in [*ROOT.glob("*.py"), *(p for d in ("library", "networks", "tools", "bench") for p in (ROOT / d).rglob("*.py"))]:
        text = path.read_text()
        assert ("sys.path" not in text or path in foreign) and "os.environ.setdefault" not in text, path
    assert "sys.path.insert(0, shim)" in (ROOT / "bench" / "dataloader.py").read_text()  # and only that edit
    assert (ROOT / "bench" / "dataloader.py").read_text().count("sys.path") == 1


def test_tools_run_from_the_root_with_no_path_set_up() -> None:
    """As a user runs them after `pip install -e .`: ``python tools/x.py`` puts tools/ first on sys.path, not the
    root, so ``library``, ``networks`` and the entry scripts must come from the install (the demo once failed)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for script in ("tools/demo.py", "networks/merge_lora.py", "tools/make_tiny_model.py"):
        result = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, env=env, capture_output=True, text=True)
        assert result.returncode == 0 and "usage:" in result.stdout, script + result.stderr[-2000:]


def test_quick_start_scripts_exist() -> None:
    for command in quick_start_commands():
        for script in re.findall(r"python (\S+\.py)", command):
            assert (ROOT / script).is_file(), script
        for requirements in re.findall(r"-r (\S+)", command):
            assert (ROOT / requirements).is_file(), requirements


def test_ci_runs_the_readme_command_in_a_fresh_virtual_environment() -> None:
    """A package installed by hand on the CI machine must not hide a missing requirement (scipy once did)."""
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    create = next(i for i, line in enumerate(lines) if re.match(r"python3? -m venv \S*\$\S*", line))
    activate = next(i for i, line in enumerate(lines) if line.startswith("source ") and line.endswith("/bin/activate\""))
    command = lines.index(quick_start_commands()[1])
    assert create < activate < command
    assert "--system-site-packages" not in lines[create]
    assert "mktemp -d" in "\n".join(lines[:create])


def test_every_imported_package_is_a_requirement() -> None:
    """Every third-party module the product imports (library, networks, tools, scripts) is installed by
    requirements.txt or is one of the optional extras imported only when a flag asks for it."""
    import sys

    declared = {"torch", "accelerate", "diffusers", "transformers", "safetensors", "toml", "cv2", "PIL", "numpy",
                "tqdm", "tensorboard", "peft", "scipy", "huggingface_hub"}
    requirements = (ROOT / "requirements.txt").read_text()
    pip_names = {"cv2": "opencv-python-headless", "PIL": "pillow"}
    for module in declared:
        assert f"{pip_names.get(module, module)}==" in requirements, module
    optional = {"xformers", "bitsandbytes", "deepspeed", "prodigyopt", "lion_pytorch", "dadaptation", "schedulefree",
                "wandb", "psutil", "lycoris", "webdataset", "onnxruntime"}
    imported = set()
    files = [p for folder in ("library", "networks", "tools") for p in (ROOT / folder).rglob("*.py")]
    for path in files + list(ROOT.glob("train_*.py")):
        for match in re.finditer(r"^\s*(?:from ([A-Za-z_]\w*)[\w.]* import|import ([A-Za-z_]\w*))", path.read_text(), flags=re.M):
            imported.add(match.group(1) or match.group(2))
    local = {"library", "networks", "tools", "train_network", "train_sdxl", "fine_tune", "train_controlnet", "__future__"}
    third_party = imported - set(sys.stdlib_module_names) - local
    assert third_party <= declared | optional, sorted(third_party - declared - optional)
