"""``gft-train``: the command line.

    gft-train                          # the embedded demo (same as `gft-train demo`)
    gft-train build-groups --config c.yaml --groups-file groups.jsonl
    gft-train train --config c.yaml [--method gft|sft|dft|grpo] [--no-dcr] [--no-gal] [--resume] ...
    gft-train eval --model runs/gft/final --eval-file eval.jsonl [--base-model base]

Under several processes: ``accelerate launch [--multi_gpu --num_processes N] -m gft_train.cli train ...``.

An error ends the command with one line on stderr (file, row, field, value where they apply)
and exit status 1; ``--debug`` or ``GFT_DEBUG=1`` shows the traceback instead. SIGTERM or SIGINT
ends ``train`` at the next step boundary with a checkpoint, one line saying how to resume, and
exit status 128 + the signal's number. ``main`` itself raises (for callers in Python); ``cli`` is
the console entry point.

Under several processes the main process alone speaks: its messages, warnings, ``final model:``
and its error line; another process that fails with one of the errors every process meets alike
(bad input: ValueError, TypeError, OSError) exits 1 without repeating it, and one that crashes
otherwise says so once, naming itself. The launcher then reports the exit.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

try:
    from . import config as config_mod
except ModuleNotFoundError as e:  # `pip install gft` is the kernel library alone
    raise SystemExit(
        f"gft-train needs the trainer's dependencies ({e.name} is not installed): pip install 'gft[train]'"
    ) from e


def _cmd_build_groups(cfg):
    from .data import load_rows
    from .groups import build_groups, group_metrics, save_groups
    from .metrics import strict_json
    from .models import load_model, model_options
    from .rewards import load_reward
    from .rollout import make_engine

    cfg = cfg.resolved()
    if not cfg.groups_file:
        raise ValueError("build-groups needs --groups-file (where to write the groups)")
    rows = load_rows(cfg.train_file, cfg.columns, cfg.train_split, cfg.dataset_config, answers=cfg.uses_group_advantage)
    reward = load_reward(cfg.reward)  # (before the model: a reward that cannot load stops here)
    model, tokenizer = load_model(cfg.model, **model_options(cfg))
    engine = (
        make_engine(cfg.engine, model=model, tokenizer=tokenizer, model_path=cfg.model, cfg=cfg) if cfg.n_self else None
    )
    teacher = None
    if cfg.teacher_model:
        t_model, t_tok = load_model(cfg.teacher_model, **model_options(cfg, teacher=True))
        teacher = make_engine(cfg.engine, model=t_model, tokenizer=t_tok, model_path=cfg.teacher_model, cfg=cfg)
    groups = build_groups(rows, cfg, engine, reward, teacher, seed=cfg.seed)
    Path(cfg.groups_file).parent.mkdir(parents=True, exist_ok=True)
    save_groups(groups, Path(cfg.groups_file))
    print(strict_json({"groups": len(groups), **group_metrics(groups)}, indent=1))


def _process_index() -> int:
    """This process's rank as the launcher (torchrun, accelerate launch) set it; 0 alone."""
    return int(os.environ.get("RANK", "0") or 0)


def _cmd_train(cfg):
    from .trainer import train

    final = train(cfg)
    if _process_index() == 0:
        print(f"final model: {final}")


def _cmd_eval(cfg, base_model: str | None):
    from .evaluate import evaluate_model
    from .metrics import strict_json

    cfg = cfg.resolved()
    result = evaluate_model(cfg.model, {"eval": cfg.eval_file}, cfg, base_dir=base_model or None)
    out = {**result.pop("eval"), **result}
    print(strict_json({k: v for k, v in out.items() if k != "per_prompt"}, indent=1))  # the summary (strict JSON)
    return out


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if _process_index() != 0:  # the main process says each warning once
        import warnings

        warnings.simplefilter("ignore")
    parser = argparse.ArgumentParser(
        prog="gft-train",
        description="Group Fine-Tuning on accelerate. With no command: the embedded demo.",
        epilog="`gft-train COMMAND --help` lists the command's flags, each with its help and default. Every "
        "config field is a flag and a YAML key (--config); flags given override the YAML.",
    )
    from .demo.sums import REGIMES

    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="the embedded demo on a CPU (the default)")
    demo.add_argument("--output-dir", default="runs/demo", help="where the demo writes its runs (default: runs/demo)")
    demo.add_argument("--quick", action="store_true", help="a smaller demo, as the tests run it (default: off)")
    demo.add_argument(
        "--regime",
        default="new-skill",
        choices=tuple(REGIMES),
        help="what the base knows before fine-tuning: new-skill (it lacks the skill the expert shows), "
        "competent (the paper's regime), imperfect (right on about 3/4) (default: new-skill)",
    )
    demo.add_argument("--debug", action="store_true", help="on an error, show the traceback (default: off)")
    for name, help_ in (
        ("build-groups", "build groups once (offline) and save them to --groups-file"),
        ("train", "train a model"),
        ("eval", "evaluate a model on held-out prompts"),
    ):
        p = sub.add_parser(name, help=help_, description=help_ + ".")
        config_mod.add_arguments(p)
        p.add_argument(
            "--debug",
            action="store_true",
            help="on an error, show the traceback, not the one-line message (also GFT_DEBUG=1) (default: off)",
        )
        if name == "eval":
            p.add_argument(
                "--base-model",
                help="also report KL(model || base) on the held-out expert answers "
                "and KL(base || model) on the base's own samples (default: none)",
            )
    args = parser.parse_args(argv or ["demo"])
    if args.command in (None, "demo"):
        from .demo.run import run_demo

        run_demo(
            Path(getattr(args, "output_dir", "runs/demo")),
            quick=getattr(args, "quick", False),
            regime=getattr(args, "regime", "new-skill"),
        )
        return
    cfg = config_mod.from_args(args)
    if args.command == "build-groups":
        _cmd_build_groups(cfg)
    elif args.command == "train":
        _cmd_train(cfg)
    else:
        _cmd_eval(cfg, args.base_model)


def _debug(argv) -> bool:
    return "--debug" in argv or os.environ.get("GFT_DEBUG", "").lower() not in ("", "0", "false", "no")


def cli(argv=None) -> None:
    """The console entry point: ``main`` with an error as one line and exit status 1 (a user
    needs the message, which names what to fix, not the 20 frames above it)."""
    argv = sys.argv[1:] if argv is None else argv
    rank = _process_index()
    try:
        main(argv)
    except KeyboardInterrupt:
        if rank == 0:
            print("gft-train: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:
        trainer = sys.modules.get(f"{__package__}.trainer")  # (not imported: not a stopped run)
        if trainer is not None and isinstance(e, trainer.TrainingStopped):  # every process stops at one step
            if rank == 0:
                print(f"gft-train: {e}", file=sys.stderr)
            raise SystemExit(e.exit_code) from None
        if _debug(argv):
            raise
        text = " ".join(str(e).split()) or type(e).__name__
        ours = isinstance(e, (ValueError, TypeError, OSError, NotImplementedError))
        if not ours:
            text = f"{type(e).__name__}: {text} (--debug shows where)"  # not one of ours: say what it is
        if rank == 0:
            print(f"gft-train: error: {text}", file=sys.stderr)
        elif not ours:  # a crash of this process alone: the main one may not know it
            print(f"gft-train: error on process {rank}: {text}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    cli()
