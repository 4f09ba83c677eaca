"""The README's commands run as written: every complete ``diffpure-fast`` command of its code blocks that needs
nothing but the embedded digits model, through ``main([...])``, with small sizes appended (argparse keeps the last
value of a flag, so the command itself is unchanged). ``eval ... --attack X`` lines are the block's full eval
command with X, as a reader runs them, each into its own sub-folder of ``out/study`` (the README's study layout,
which its ``report out/study`` then reads). Commands naming files a user must supply (checkpoints, CIFAR-10, LPIPS
weights), a GPU, or placeholders are left out, and the test says which ones it ran."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from diffpure_fast.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
# what a user must bring, or a synopsis line: not runnable here as written
NEEDS_ELSEWHERE = ("--checkpoint", "cifar10:", "alexnet:", "/path/", "--device cuda", "[", "{", "FOLDER", "FILE")
SMALL = {
    "eval": ["--n-images", "2", "--batch-size", "2", "--n-eval", "1", "--attack-steps", "1", "--eot", "1",
             "--steps", "1", "--quiet"],
    "certify": ["--n0", "4", "--n", "8", "--n-images", "1", "--quiet"],
    "demo": ["--n-images", "2", "--adaptive-steps", "1", "--eot", "1", "--pgd-steps", "1", "--n-eval", "1",
             "--steps", "1", "--guided-images", "0", "--ode-images", "0"],
    "bench": ["--batch-sizes", "1", "--steps", "2", "--grad-modes", "none", "--repeats", "1", "--no-official"],
    "report": ["--quiet"],
    "info": [],
}


def readme_commands() -> list[list[str]]:
    """The runnable diffpure-fast commands of the README's code blocks, in order, "..." expanded."""
    out, block, cur, base = [], False, [], None
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            block, base = not block, None
            continue
        if not block:
            continue
        cur.append(line.rstrip().rstrip("\\").strip())
        if line.rstrip().endswith("\\"):
            continue
        text, cur = re.split(r"\s+#", " ".join(cur))[0].strip(), []
        if not text.startswith("diffpure-fast "):
            continue
        if text.startswith("diffpure-fast eval ...") and base is not None:
            words = shlex.split(base)
            # as the README's note says: the unrestricted attacks take no --eps, AutoAttack as released no
            # --attack-steps or --eot
            drop = ({"--output"} | ({"--eps"} if "--bound" in text else set())
                    | ({"--attack-steps", "--eot"} if "as-released" in text else set()))
            kept = [w for k, w in enumerate(words) if w not in drop and (k == 0 or words[k - 1] not in drop)]
            text = shlex.join(kept) + text[len("diffpure-fast eval ..."):]
            text += " --output out/study/" + re.sub(r"\W+", "_", text.rsplit("--attack", 1)[-1]).strip("_")
        elif text.startswith("diffpure-fast eval") and "..." not in text:
            base = text
        if "..." in text or any(s in text for s in NEEDS_ELSEWHERE):
            continue
        out.append(shlex.split(text)[1:])
    return out


def test_the_readme_has_the_commands_this_test_runs():
    cmds = readme_commands()
    assert {c[0] for c in cmds} >= {"eval", "report", "certify", "bench", "demo", "info"}
    attacks = {c[len(c) - 1 - c[::-1].index("--attack") + 1] for c in cmds if c[0] == "eval" and "--attack" in c}
    assert attacks >= {"pgd-eot", "bpda-eot", "apgd-eot", "diffattack", "diffhammer", "lf", "stadv", "autoattack"}


def test_every_digits_command_of_the_readme_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)   # the commands write out/... relative to where they run
    ran = []
    for argv in readme_commands():
        small = SMALL[argv[0]]
        if "as-released" in argv:   # the package's own iterations and EOT: only the sizes of the run
            small = [w for k, w in enumerate(small) if w not in ("--attack-steps", "--eot")
                     and small[k - 1] not in ("--attack-steps", "--eot")]
        rc = main(argv + small)
        err = capsys.readouterr().err
        assert rc == 0, f"diffpure-fast {shlex.join(argv)}: exit {rc}: {err[-2000:]}"
        ran.append(argv[0])
    assert ran.count("eval") >= 10 and "report" in ran and "certify" in ran
