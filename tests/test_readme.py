"""README.md stays true: every code block is run here, run by a named test, or says why it cannot be.

Before each fenced block README.md has a marker line:
  <!-- readme-test: run -->                        a Python block, executed here as written, except that the
                                                    variant "B/16" becomes the tiny "test/8" (a CPU second);
  <!-- readme-test: by tests/FILE.py::TEST -->     run by that test (which must exist and use the command);
  <!-- readme-test: not run: REASON -->            e.g. needs ImageNet or a TPU pod;
  <!-- test-command -->                            the test command, which CI (.ci/run) runs.
"""

import os
import re
import subprocess
import sys

import pytest

from runs import ROOT, xla_flags

pytestmark = pytest.mark.slow  # end-to-end runs or PyTorch comparisons: not in the quick subset

MARKER = re.compile(r"<!-- (?:readme-test: (?P<what>.+?)|(?P<ci>test-command)) -->$")


def blocks():
    """(marker, language, code, line) of every fenced block of README.md."""
    lines = open(os.path.join(ROOT, "README.md")).read().splitlines()
    found, i = [], 0
    while i < len(lines):
        if lines[i].startswith("```"):
            language, start = lines[i][3:].strip(), i
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            marker = MARKER.match(lines[start - 1]) if start else None
            found.append((marker, language, "\n".join(lines[start + 1:end]), start + 1))
            i = end
        i += 1
    return found


def _run_python(code: str, cwd) -> subprocess.CompletedProcess:
    code = code.replace('"B/16"', '"test/8"')
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=xla_flags(1))
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_every_block_is_run_or_says_why():
    assert len(blocks()) >= 10
    for marker, language, code, line in blocks():
        assert marker, f"README.md:{line}: the {language} block has no <!-- readme-test: ... --> marker"
        what = marker["what"] or ""
        if what.startswith("by "):
            path, name = what[3:].split("::")
            source = open(os.path.join(ROOT, path)).read()
            assert f"def {name}(" in source, f"README.md:{line}: {what} does not exist"
            command = re.search(r"(mae_jax\.\w+|(?:configs|benchmarks)/\w+\.py)", code)
            body = source[source.index(f"def {name}("):]
            body = body[:re.search(r"\n(def |@)", body[1:]).start() + 1] if re.search(r"\n(def |@)", body[1:]) else body
            assert command and command.group(1) in body, (line, what, "the test does not run this command")
        elif what.startswith("not run:"):
            assert len(what) > len("not run: ") + 10, f"README.md:{line}: say why the block is not run"
        else:
            assert what == "run" and language == "python" or marker["ci"], (line, what)


def _tiny_export(tmp_path):
    """A tiny MAE written as an official .pth (with its architecture), a HF directory and our checkpoint."""
    from mae_jax import checkpoints, models

    model = models.MaskedAutoencoderViT(**models.variant("test/8", image_size=32))
    import jax

    variables = models.init_variables(model, jax.random.key(0))
    checkpoints.save_variables(tmp_path / "ours", variables, models.constructor_fields(model))
    return model, variables


@pytest.mark.parametrize("index", [i for i, (m, lang, _, _) in enumerate(blocks()) if m and m["what"] == "run"])
def test_python_block_runs(index, tmp_path):
    marker, language, code, line = blocks()[index]
    if "mae_pretrain_vit_base.pth" in code:  # the conversion example reads an official file: write one
        pytest.importorskip("torch", reason="reading a .pth needs torch")
        _tiny_export(tmp_path)
        _convert(tmp_path, "ours", "mae_pretrain_vit_base.pth", "--to", "official")
    result = _run_python(code, tmp_path)
    assert result.returncode == 0, f"README.md:{line}:\n{result.stderr[-3000:]}"


def _convert(cwd, *args) -> str:
    result = subprocess.run([sys.executable, "-m", "mae_jax.convert", *map(str, args)], cwd=cwd,
                            env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (args, result.stderr[-3000:])
    return result.stdout + result.stderr


@pytest.mark.long
def test_convert_commands(tmp_path):
    """The README's conversion commands, as written, on tiny models saved under the names they use."""
    pytest.importorskip("torch", reason="writing and reading .pth files needs torch")
    _tiny_export(tmp_path)
    _convert(tmp_path, "ours", "mae_pretrain_vit_base.pth", "--to", "official")
    _convert(tmp_path, "ours", "mae_visualize_vit_large.pth", "--to", "official")
    _convert(tmp_path, "ours", "vit-mae-base", "--to", "hf")
    code = next(code for marker, _, code, _ in blocks() if marker and "test_convert_commands" in (marker["what"] or ""))
    for command in code.splitlines():
        command = command.split("#")[0].replace("/tmp/", f"{tmp_path}/out_").split()
        assert command[:3] == ["python", "-m", "mae_jax.convert"], command
        _convert(tmp_path, *command[3:])
    from mae_jax import checkpoints

    fields, variables = checkpoints.load_variables(tmp_path / "out_mae_b16_448")
    assert fields["image_size"] in (448, (448, 448))
    assert variables["constants"]["pos_embed"].shape == (1, 1 + 56 * 56, 32)
    assert (tmp_path / "out_mae_b16_hf" / "config.json").exists() and (tmp_path / "out_mae_b16.pth").exists()
