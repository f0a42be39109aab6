"""`python -m trainer <command>`: thin entry points; each command's module holds the work."""

import argparse
import logging


def main() -> None:
    from trainer.commands import add_parsers
    from trainer.settings import TrainerSettings

    parser = argparse.ArgumentParser(prog="python -m trainer")
    commands = parser.add_subparsers(dest="command", required=True)

    init = commands.add_parser("init-model", help="build the default base model (tokenizer + small Llama)")
    init.add_argument("--out", required=True, help="directory to write the Hugging Face model into")
    init.add_argument("--preset", default="small", choices=["tiny", "small"], help="tiny is for tests")
    init.add_argument("--seed", type=int, default=0)

    commands.add_parser(
        "run", help="the continuous loop: consume feedback, train, publish (settings from env)"
    )
    add_parsers(commands, default_base_model=TrainerSettings().base_model)  # sft, rm, ppo

    args = parser.parse_args()
    if args.command == "init-model":
        from trainer.init_model import main as init_model

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        init_model(out=args.out, preset=args.preset, seed=args.seed)
    elif args.command == "run":
        from trainer.loop import main as run_loop

        run_loop()
    else:
        args.run(args)


if __name__ == "__main__":
    main()
