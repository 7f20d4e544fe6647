"""The `deltalora` command: one name for every command line of the package.

    deltalora train [group=option ...] [key=value ...] [-m]     = python -m deltalora_repro
    deltalora <command> [arguments]                             = python -m deltalora_repro.<module>

Each subcommand hands the rest of the command line to its module unchanged, so
`deltalora <command> --help` is that module's own help.
"""
from __future__ import annotations

import importlib
import sys

# name -> (module, one line for `deltalora --help`). A module is imported only when its command
# runs: several of them import torch, which `deltalora --help` should not wait for.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("deltalora_repro.__main__",
              "train and evaluate one run, or a sweep with -m (Hydra overrides)"),
    "score": ("deltalora_repro.score",
              "score a file of predictions with the official E2E or WebNLG metrics"),
    "score-run": ("deltalora_repro.score_run",
                  "score a finished run's kept predictions into a score record"),
    "tables": ("deltalora_repro.tables",
               "render run records into the paper's Tables 1-8 (and Figure 3)"),
    "promote": ("deltalora_repro.promote",
                "copy finished runs into the committed results folder"),
    "export": ("deltalora_repro.export",
               "export a finished run as a merged Hugging Face model directory"),
    "bench": ("deltalora_repro.bench",
              "time the training step and decoding (tokens/s, peak memory)"),
    "figure3": ("deltalora_repro.figure3",
                "Figure 3: cosine similarity of fine-tuned vs pretrained Wq / Wv per block"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: deltalora <command> [arguments]", "",
             "Delta-LoRA and its baselines: train, score, tabulate (arXiv 2309.02411).", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "deltalora <command> --help shows the command's own help."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; valid: {', '.join(COMMANDS)}\n\n{usage()}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    if name == "train":
        # Hydra parses sys.argv itself; the run record's command line is rebuilt from it too.
        sys.argv = [sys.argv[0], *rest]
        module.entry()
        return 0
    code = module.main(rest)
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
